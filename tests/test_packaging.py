"""The package's data files (card templates, demo images, demo weights) are declared, so an install ships them and a
build prints no setuptools warning of ours (issue 21: "Package 'hf_clip_forget.model_cards' is absent from the
`packages` configuration", once per data folder and file, on every install)."""

import configparser
import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_clip_forget"


def _data_files() -> list[str]:
    """Every file of the package that is not Python source, as a path relative to the repository root (the
    ``model_cards`` link followed, as setuptools follows it)."""
    found = []
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith((".py", ".pyc")):
                found.append(Path(folder, name).relative_to(ROOT).as_posix())
    return sorted(found)


def _package_data() -> dict[str, list[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return {
        package: [p.strip() for p in patterns.replace("\n", ",").split(",") if p.strip()]
        for package, patterns in config["options.package_data"].items()
    }


def _declared(path: str, package_data: dict[str, list[str]]) -> bool:
    """Whether a package_data pattern of the file's package or one above it matches it (setuptools' rule)."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        package, rest = ".".join(parts[:depth]), "/".join(parts[depth:])
        if any(fnmatch.fnmatchcase(rest, pattern) for pattern in package_data.get(package, [])):
            return True
    return False


def test_the_card_templates_and_demo_images_are_declared_package_data():
    package_data = _package_data()
    files = _data_files()
    expected = {
        "hf_clip_forget/model_cards/forget_adapter.md",
        "hf_clip_forget/model_cards/demo_dual_encoder.md",
        "hf_clip_forget/demo_images/images.json",
        "hf_clip_forget/demo_images/dog_1.jpg",
        "hf_clip_forget/models/demo_projections.safetensors",
    }
    assert expected <= set(files)
    undeclared = [f for f in files if not _declared(f, package_data)]
    assert not undeclared, f"data files no package_data pattern of setup.cfg matches: {undeclared}"


def test_a_wheel_build_ships_the_data_and_warns_of_nothing(tmp_path):
    """Builds a wheel from a copy of the project with setuptools' PEP 517 backend (as pip does, without isolation)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "model_cards", src / "model_cards")
    shutil.copytree(PACKAGE, src / "hf_clip_forget", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    # "byte-compiling is disabled" is distutils' note under PYTHONDONTWRITEBYTECODE, not about this project
    warnings = [
        line
        for line in output.splitlines()
        if ("warning" in line.lower() or "absent from" in line) and "byte-compiling is disabled" not in line
    ]
    assert not warnings, "\n".join(warnings)
    wheel = src / "dist" / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    missing = [f for f in _data_files() if f not in shipped]
    assert not missing, f"data files the wheel lacks: {missing}"
