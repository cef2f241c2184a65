"""The package is layered: core → tuners (peft glue) → api → (hub, evaluation, audit, calibration, index) → cli. Imports go downwards only."""

import ast
import pathlib

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hf_clip_forget"
# lower number = lower layer; a module may import only from its own layer or lower ones
LAYERS = {
    "core": 1,
    "models": 1,
    "tuners": 2,
    "api": 3,
    "hub": 4,
    "evaluation": 4,
    "audit": 4,
    "calibration": 4,
    "index": 4,
    "cli": 5,
    "testing_utils": 1,
    "files": 1,
    "families": 1,
    "_version": 1,
    "__init__": 6,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def internal_imports(path: pathlib.Path):
    module = "hf_clip_forget." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("hf_clip_forget"):
                yield module.removesuffix(".__init__"), target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_clip_forget"):
                    yield module.removesuffix(".__init__"), alias.name


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downwards_only(path):
    for module, target in internal_imports(path):
        if target == "hf_clip_forget" or module == "hf_clip_forget":
            continue
        assert layer_of(target) <= layer_of(module), f"{module} (layer {layer_of(module)}) imports {target}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda p: p.name)
def test_the_math_core_knows_nothing_of_peft(path):
    tree = ast.parse(path.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] in ("peft", "huggingface_hub")]
