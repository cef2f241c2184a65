"""A shared adapter is hostile until proven otherwise (issue 20): a conformance suite of tampered adapters.

Each row tampers one field or file of an honest saved adapter (forgetting "dog"); every loader — ours, plain peft's
``PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` — must refuse it, leave the base model's
every tensor bit-identical (sha256), its modules unwrapped and usable (an honest adapter still loads onto it), and
the adapter directory unchanged.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from hf_clip_forget import ForgetPeftModel, add_forget_adapter, verify_forget_adapter
from hf_clip_forget.testing_utils import tiny_clip
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer


WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FACTOR = "base_model.model.visual_projection.projection_edit_forget"


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """Honest saved adapters forgetting "dog" (nullspace and CCUP) and "cat", made once for the module."""
    from hf_clip_forget.testing_utils import tiny_tokenizer

    root = tmp_path_factory.mktemp("honest")
    tokenizer = tiny_tokenizer()
    add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False).save_pretrained(root / "dog")
    add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False).save_pretrained(root / "cat")
    add_forget_adapter(
        tiny_clip(), ["dog"], tokenizer, method="ccup", retain_classes=["cat"], show_progress=False
    ).save_pretrained(root / "ccup")
    return root


def copy_adapter(source, destination) -> None:
    os.makedirs(destination)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as handle:
            data = handle.read()
        with open(os.path.join(destination, name), "wb") as handle:
            handle.write(data)


# ------------------------------------------------------------------------------------------------ tamper helpers
def edit_config(**changes) -> Callable:
    def tamper(directory, honest):
        path = directory / CONFIG
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            elif callable(value):
                value(config)
            else:
                config[key] = value
        path.write_text(json.dumps(config))

    return tamper


DELETE = object()


def edit_weights(change: Callable[[dict], dict]) -> Callable:
    def tamper(directory, honest):
        tensors = load_file(directory / WEIGHTS)
        save_file(change(tensors), directory / WEIGHTS)

    return tamper


def with_tensor(key, value):
    return edit_weights(lambda tensors: {**tensors, key: value})


def factor_as(transform):
    return edit_weights(lambda tensors: {**tensors, FACTOR: transform(tensors[FACTOR]).contiguous()})


def write_raw(text: bytes, name=CONFIG):
    def tamper(directory, honest):
        (directory / name).write_bytes(text)

    return tamper


def symlink_weights_to(target: str):
    def tamper(directory, honest):
        (directory / WEIGHTS).unlink()
        os.symlink(honest / target / WEIGHTS, directory / WEIGHTS)

    return tamper


def truncate_weights(directory, honest):
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


def header_bomb(directory, honest):
    # a header length of 2**60 bytes: a reader that trusts it allocates without bound
    (directory / WEIGHTS).write_bytes((2**60).to_bytes(8, "little") + b"{}")


def drop_tower_fingerprints(config):
    config["base_fingerprints"] = {k: v for k, v in config["base_fingerprints"].items() if not k.startswith("tower:")}


@dataclass(frozen=True)
class Attack:
    name: str
    tamper: Callable
    message: str  # what our refusal says (a regex)
    source: str = "dog"
    # rows whose file peft itself parses before any method code runs: plain peft refuses them with its own error
    peft_parses_first: bool = False


ATTACKS = [
    # 1: nothing but the edit
    Attack("extra base weight: attention",
           with_tensor("base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.weight", torch.zeros(32, 32)),
           "carry tensors outside its edit"),
    Attack("extra base weight: the projection itself",
           with_tensor("base_model.model.visual_projection.base_layer.weight", torch.zeros(16, 32)),
           "carry tensors outside its edit"),
    Attack("extra unrelated tensor", with_tensor("unrelated", torch.zeros(1)), "carry tensors outside its edit"),
    # 2: checksums on every path, re-encodings, links
    Attack("factor re-encoded as bfloat16", factor_as(lambda f: f.to(torch.bfloat16)), "float32"),
    Attack("factor re-encoded as int32", factor_as(lambda f: (f * 1000).to(torch.int32)), "float32"),
    Attack("factor of another adapter", factor_as(lambda f: load_file_of("cat")[FACTOR]), "do not match the checksums"),
    Attack("weights are a link to another adapter's", symlink_weights_to("cat"), "symbolic link"),
    # 3: deleting a check does not switch it off
    Attack("no factor_checksums", edit_config(factor_checksums=DELETE), "trust_unverified"),
    Attack("empty factor_checksums", edit_config(factor_checksums={}), "trust_unverified"),
    Attack("no base_fingerprints", edit_config(base_fingerprints=DELETE), "trust_unverified"),
    Attack("empty base_fingerprints", edit_config(base_fingerprints={}), "trust_unverified"),
    Attack("tower fingerprints removed", edit_config(base_fingerprints=drop_tower_fingerprints), "lack"),
    Attack("a saved load option", edit_config(verify_base_fingerprint=False), "options of one load"),
    Attack("a saved trust flag", edit_config(trust_unverified=True), "options of one load"),
    # 5: an adapter that does nothing, or edits other layers
    Attack("alpha 0", edit_config(alpha=0.0), "identity"),
    Attack("CCUP lambda 0", edit_config(ccup_lambda=0.0), "identity", source="ccup"),
    Attack("targets an attention layer",
           edit_config(target_modules=["vision_model.encoder.layers.0.self_attn.q_proj"]),
           "not the embedding layers"),
    Attack("targets the text encoder and the projection",
           edit_config(target_modules=["visual_projection", "text_model.encoder.layers.0.mlp.fc1"]),
           "not the embedding layers"),
    # 6: refusals that used to leave the base wrapped
    Attack("target_modules regex", edit_config(target_modules=".*"), "regular-expression form"),
    Attack("target_modules a string", edit_config(target_modules="visual_projection"), "regular-expression form"),
    Attack("task_type CAUSAL_LM", edit_config(task_type="CAUSAL_LM"), "task_type"),
    Attack("NaN factor", factor_as(lambda f: torch.cat([torch.full_like(f[:1], float("nan")), f[1:]])),
           "NaN or inf"),
    Attack("truncated weights", truncate_weights, "not a readable weights file"),
    Attack("header bomb", header_bomb, "not a readable weights file"),
    Attack("factor of the wrong shape", factor_as(lambda f: torch.ones(16, 3)), "shape"),
    Attack("rank_pattern out of range", edit_config(rank_pattern={"visual_projection": 2_000_000}), "2000000"),
    # 7: malformed configs answer with the field's name
    Attack("rank_pattern a string", edit_config(rank_pattern="x"), "`rank_pattern` must be"),
    Attack("projection_shapes a string", edit_config(projection_shapes="x"), "`projection_shapes` must be"),
    Attack("base_fingerprints a string", edit_config(base_fingerprints="x"), "`base_fingerprints` must be"),
    Attack("factor_checksums a string", edit_config(factor_checksums="x"), "`factor_checksums` must be"),
    Attack("forgotten_classes null", edit_config(forgotten_classes=None), "names no `forgotten_classes`"),
    Attack("exclude_modules", edit_config(exclude_modules=["text_projection"]), "`exclude_modules` must be"),
    Attack("deep nesting",
           lambda d, h: (d / CONFIG).write_text((d / CONFIG).read_text().replace('"calibration": {}', '"calibration": ' + "[" * 5000 + "]" * 5000)),
           "nested", peft_parses_first=True),
    Attack("UTF-16 config", lambda d, h: (d / CONFIG).write_bytes((d / CONFIG).read_text().encode("utf-16")),
           "UTF-16", peft_parses_first=True),
    Attack("invalid JSON", write_raw(b'{"peft_type": '), "not valid JSON", peft_parses_first=True),
    Attack("NaN in the JSON", lambda d, h: (d / CONFIG).write_text((d / CONFIG).read_text().replace('"alpha": 1.0', '"alpha": NaN')),
           "finite numbers only"),
]  # fmt: skip

_HONEST_ROOT = {}


def load_file_of(name):
    return load_file(_HONEST_ROOT["root"] / name / WEIGHTS)


def tensor_hashes(model) -> dict[str, str]:
    return {
        name: hashlib.sha256(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, value in model.state_dict().items()
    }


def directory_hashes(directory) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() + ("@link" if path.is_symlink() else "")
        for path in sorted(directory.iterdir())
    }


def load_forget(base, directory):
    return ForgetPeftModel.from_pretrained(base, directory)


def load_plain_peft(base, directory):
    return PeftModel.from_pretrained(base, directory)


def load_transformers(base, directory):
    base.load_adapter(str(directory))
    return base


LOADERS = {"ForgetPeftModel": load_forget, "PeftModel": load_plain_peft, "transformers": load_transformers}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_a_tampered_adapter_is_refused_and_changes_nothing(honest, tmp_path, attack, loader):
    _HONEST_ROOT["root"] = honest
    directory = tmp_path / "tampered"
    copy_adapter(honest / attack.source, directory)
    attack.tamper(directory, honest)
    files_before = directory_hashes(directory)
    base = tiny_clip()
    before = tensor_hashes(base)
    our_message = not (attack.peft_parses_first and loader != "ForgetPeftModel")
    with pytest.raises(Exception, match=attack.message if our_message else None) as refusal:
        LOADERS[loader](base, directory)
    if our_message:
        assert isinstance(refusal.value, ValueError), refusal.value
    assert tensor_hashes(base) == before, "a base tensor changed"
    assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules()), "the base stayed wrapped"
    assert not getattr(base, "_hf_peft_config_loaded", False) and "peft_config" not in base.__dict__
    assert directory_hashes(directory) == files_before, "the adapter directory changed"
    # the base is usable and takes an honest adapter afterwards
    base.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    ForgetPeftModel.from_pretrained(base, honest / "dog")


def test_an_adapter_built_on_another_text_tower_is_refused(honest):
    # same projections, another text tower: the prompts were embedded elsewhere, so the edit removes the wrong span
    base = tiny_clip()
    other = tiny_clip(seed=1)
    base.text_model.load_state_dict(other.text_model.state_dict())
    before = tensor_hashes(base)
    for loader in LOADERS.values():
        with pytest.raises(ValueError, match=r"fingerprint mismatch for \['tower:text_model'\]"):
            loader(base, honest / "dog")
        assert tensor_hashes(base) == before
        assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules())


def test_trust_unverified_loads_a_stripped_adapter_and_says_so(honest, tmp_path, tokenizer):
    directory = tmp_path / "stripped"
    copy_adapter(honest / "dog", directory)
    edit_config(factor_checksums=DELETE, base_fingerprints=DELETE)(directory, honest)
    with pytest.raises(ValueError, match="trust_unverified"):
        ForgetPeftModel.from_pretrained(tiny_clip(), directory)
    for loaded in (
        ForgetPeftModel.from_pretrained(tiny_clip(), directory, trust_unverified=True),
        PeftModel.from_pretrained(tiny_clip(), directory, trust_unverified=True),
    ):
        assert loaded.peft_config["default"].trust_unverified
        report = verify_forget_adapter(loaded, tokenizer=tokenizer)
        assert report.ok and "unverified" in str(report)
    card = tmp_path / "resaved"
    ForgetPeftModel.from_pretrained(tiny_clip(), directory, trust_unverified=True).save_pretrained(card)
    assert "**Unverified.**" in (card / "README.md").read_text()
    with pytest.raises(ValueError, match="trust_unverified"):  # a re-save does not launder it
        ForgetPeftModel.from_pretrained(tiny_clip(), card)


def test_a_passed_config_that_contradicts_the_saved_adapter_is_refused(honest, tmp_path):
    from hf_clip_forget import ProjectionEditConfig

    cat_config = ProjectionEditConfig.from_pretrained(str(honest / "cat"))
    base = tiny_clip()
    before = tensor_hashes(base)
    with pytest.raises(ValueError, match=r"config \(forgetting \['cat'\]\) is not the one saved with these factors"):
        PeftModel.from_pretrained(base, honest / "dog", config=cat_config)
    assert tensor_hashes(base) == before
    assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules())
    # the saved adapter's own config is accepted and kept as given (peft's `peft_config["default"] is config`)
    own = ProjectionEditConfig.from_pretrained(str(honest / "dog"))
    loaded = PeftModel.from_pretrained(base, honest / "dog", config=own)
    assert loaded.peft_config["default"] is own


@pytest.mark.parametrize("name", ["a\x00b", "x" * 10_000, "dog\ncat", "---", "../up"])
def test_hostile_adapter_names_are_refused_on_load(honest, name):
    base = tiny_clip()
    before = tensor_hashes(base)
    with pytest.raises(ValueError, match="adapter name"):
        ForgetPeftModel.from_pretrained(base, honest / "dog", adapter_name=name)
    assert tensor_hashes(base) == before
    assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": ["visual_projection", "text_projection"], "exclude_modules": ["text_projection"]},
         "`exclude_modules` must be null"),
        ({"target_modules": "visual_projection"}, "regular-expression form"),
        ({"target_modules": ".*_projection"}, "regular-expression form"),
    ],
)  # fmt: skip
def test_exclude_modules_and_regex_targets_are_refused_before_anything_is_injected(options, message):
    from hf_clip_forget import ProjectionEditConfig

    base = tiny_clip()
    before = tensor_hashes(base)
    with pytest.raises(ValueError, match=message):
        base.add_adapter(ProjectionEditConfig(forgotten_classes=["dog"], **options))
    assert tensor_hashes(base) == before
    assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules())
    assert not getattr(base, "_hf_peft_config_loaded", False)


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_load_adapter_onto_a_loaded_model_refuses_and_keeps_it_as_it_was(honest, tmp_path, attack):
    # peft's and our `load_adapter` onto a PeftModel that already holds an honest adapter
    _HONEST_ROOT["root"] = honest
    directory = tmp_path / "tampered"
    copy_adapter(honest / attack.source, directory)
    attack.tamper(directory, honest)
    for loaded in (PeftModel.from_pretrained(tiny_clip(), honest / "cat"),
                   ForgetPeftModel.from_pretrained(tiny_clip(), honest / "cat")):  # fmt: skip
        before, configs = tensor_hashes(loaded), dict(loaded.peft_config)
        with pytest.raises(Exception, match=None if attack.peft_parses_first else attack.message):
            loaded.load_adapter(str(directory), adapter_name="other")
        assert tensor_hashes(loaded) == before
        assert dict(loaded.peft_config) == configs


def test_set_peft_model_state_dict_refuses_anything_but_the_adapters_own_factors(honest):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = ForgetPeftModel.from_pretrained(tiny_clip(), honest / "dog")
    state = get_peft_model_state_dict(model)
    before = tensor_hashes(model)
    hostile = {
        "a base weight": {**state, "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)},
        "bfloat16 factors": {key: value.to(torch.bfloat16) for key, value in state.items()},
        "another adapter's factors": {FACTOR: load_file(honest / "cat" / WEIGHTS)[FACTOR]},
        "no factors": {},
    }  # fmt: skip
    for name, tampered in hostile.items():
        with pytest.raises(ValueError, match="outside its edit|float32|do not match|lack the factors"):
            set_peft_model_state_dict(model, tampered)
        assert tensor_hashes(model) == before, name
    set_peft_model_state_dict(model, state)  # its own factors load


def test_the_tower_fingerprint_tells_a_replaced_tensor_from_a_dtype_cast():
    from hf_clip_forget.core.fingerprint import fingerprint_tensors

    tensors = {name: value.detach().clone() for name, value in tiny_clip().text_model.state_dict().items()}
    recorded = fingerprint_tensors(tensors)
    cast = {name: value.to(torch.bfloat16) if value.is_floating_point() else value for name, value in tensors.items()}
    assert recorded.matches(fingerprint_tensors(cast))  # the same base in another dtype loads
    for name in [n for n, v in tensors.items() if v.is_floating_point() and v.numel() >= 64]:
        replaced = dict(tensors)
        replaced[name] = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(1))
        replaced[name] *= tensors[name].std().clamp(min=1e-3)
        assert not recorded.matches(fingerprint_tensors(replaced)), name  # any one tensor replaced is told apart


def test_a_hub_cache_snapshot_loads_and_its_links_may_point_into_its_own_blobs_only(honest, tmp_path):
    # huggingface_hub's cache: snapshots/<revision>/<file> are links to ../../blobs/<hash>
    repo = tmp_path / "models--you--clip-forget-dog"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(honest / "dog"):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes((honest / "dog" / name).read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    for loader in LOADERS.values():
        loader(tiny_clip(), snapshot)
    # a link leaving the repo's own cache is still refused
    (snapshot / WEIGHTS).unlink()
    os.symlink(honest / "cat" / WEIGHTS, snapshot / WEIGHTS)
    with pytest.raises(ValueError, match="symbolic link"):
        ForgetPeftModel.from_pretrained(tiny_clip(), snapshot)


def test_a_stack_naming_folders_outside_the_adapter_is_refused(honest, tmp_path):
    # the root of a stack names its members, which are read as subfolders (from the Hub when it cannot be listed)
    directory = tmp_path / "tampered"
    copy_adapter(honest / "dog", directory)
    edit_config(stack=["default", "../../elsewhere"])(directory, honest)
    base = tiny_clip()
    before = tensor_hashes(base)
    for loader in LOADERS.values():
        with pytest.raises(ValueError, match="`stack` must be a list of adapter names"):
            loader(base, directory)
        assert tensor_hashes(base) == before


def test_a_load_checks_the_files_once(honest, monkeypatch):
    # ForgetPeftModel.from_pretrained goes through peft's from_pretrained, which checks and injects the config, then
    # through load_adapter: the files are checked once, and the load gate still checks the factors it copies
    from hf_clip_forget.tuners.projection_edit import integrity

    calls, check = [], integrity.check_weights_file
    monkeypatch.setattr(integrity, "check_weights_file", lambda *args: calls.append(args[0]) or check(*args))
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), honest / "dog")
    assert len(calls) == 1 and loaded.forgotten_classes == {"default": ["dog"]}
