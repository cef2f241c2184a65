"""Issue 10, items 7 and 8: a downloaded adapter is untrusted input — validated before anything is allocated,
its factors checked against their checksums, and its edit recomputable from what its config says it forgets."""

import json
import tracemalloc

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from hf_clip_forget import ForgetPeftModel, add_forget_adapter, verify_forget_adapter
from hf_clip_forget.testing_utils import tiny_clip
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import assert_same_state, state_snapshot


WEIGHTS = "adapter_model.safetensors"
FACTOR_KEY = "base_model.model.visual_projection.projection_edit_forget"


@pytest.fixture
def saved(tmp_path, tokenizer):
    """A saved one-adapter directory forgetting "dog", and the factor of "cat" (same shape) to tamper with."""
    add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False).save_pretrained(tmp_path / "dog")
    add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False).save_pretrained(tmp_path / "cat")
    return tmp_path / "dog", load_file(tmp_path / "cat" / WEIGHTS)[FACTOR_KEY]


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if callable(value):
            value(config)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def replace_factor(directory, factor):
    tensors = load_file(directory / WEIGHTS)
    tensors[FACTOR_KEY] = factor.contiguous()
    save_file(tensors, directory / WEIGHTS)


def refused_untouched(directory, match, **options):
    base = tiny_clip()
    snapshot = state_snapshot(base)
    with pytest.raises(ValueError, match=match):
        ForgetPeftModel.from_pretrained(base, directory, **options)
    assert_same_state(base, snapshot)
    assert not any(isinstance(module, ProjectionEditLayer) for module in base.modules())


# --------------------------------------------------------------------------------------- 7: validate the config
def test_a_tampered_rank_pattern_is_refused_before_anything_is_allocated(saved):
    directory, _ = saved
    edit_config(directory, rank_pattern={"visual_projection": 2_000_000})
    tracemalloc.start()
    refused_untouched(directory, "rank_pattern.*exceeds the layer's 16 output features")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB were allocated before the refusal"
    # with the recorded shapes altered too, the model's own layer bounds it
    edit_config(directory, projection_shapes={"visual_projection": [10**9, 32]})
    refused_untouched(directory, "shape")
    edit_config(directory, projection_shapes=lambda c: c.pop("projection_shapes"))
    refused_untouched(directory, "2000000")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank_tolerance", 1.5, "rank_tolerance"),
        ("rank_tolerance", 0, "rank_tolerance"),
        ("ccup_lambda", 1e160, "ccup_lambda"),
        ("ccup_mu", -1, "ccup_mu"),
        ("alpha", 2.0, "alpha"),
        ("rank_pattern", {"visual_projection": 0}, "rank_pattern"),
    ],
)
def test_loaded_settings_out_of_range_are_refused(saved, field, value, message):
    directory, _ = saved
    edit_config(directory, **{field: value})
    refused_untouched(directory, message)


def test_an_adapter_of_another_peft_method_is_refused_by_forget_loading(tmp_path):
    lora = get_peft_model(tiny_clip(), LoraConfig(target_modules=["visual_projection"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    refused_untouched(tmp_path / "lora", "'LORA' adapter, not a forget adapter")
    for options in ({"subfolder": "lora"}, {"config": LoraConfig(target_modules=["visual_projection"], r=2)}):
        base = tiny_clip()
        snapshot = state_snapshot(base)
        with pytest.raises(ValueError, match="not a forget adapter"):
            ForgetPeftModel.from_pretrained(base, tmp_path / "lora" if "config" in options else tmp_path, **options)
        assert_same_state(base, snapshot)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused_at_load_naming_the_adapter(saved, bad_value):
    directory, factor = saved
    broken = load_file(directory / WEIGHTS)[FACTOR_KEY].clone()
    broken[0, 0] = bad_value
    replace_factor(directory, broken)
    edit_config(directory, factor_checksums={})  # even without checksums
    refused_untouched(directory, "adapter 'default' contains? NaN or inf", trust_unverified=True)


def test_a_weights_file_without_the_factors_is_refused_at_load(saved):
    directory, _ = saved
    save_file({"unrelated": torch.zeros(1)}, directory / WEIGHTS)
    edit_config(directory, factor_checksums={})
    refused_untouched(directory, "carry tensors outside its edit: 'unrelated'", trust_unverified=True)
    save_file({}, directory / WEIGHTS)
    refused_untouched(directory, r"lack the factors \['visual_projection.forget'\]", trust_unverified=True)


# ------------------------------------------------------------------------------------------- 8: integrity
def test_saved_configs_record_a_checksum_of_every_factor(saved):
    directory, _ = saved
    config = json.loads((directory / "adapter_config.json").read_text())
    assert set(config["factor_checksums"]) == {"visual_projection.forget"}
    assert all(len(value) == 64 for value in config["factor_checksums"].values())


def test_factors_that_differ_from_their_checksums_are_refused(saved):
    directory, cat_factor = saved
    replace_factor(directory, cat_factor)  # card and config still say "dog"
    refused_untouched(directory, "do not match the checksums")


def test_verify_detects_factors_that_forget_something_else(saved, tokenizer):
    directory, cat_factor = saved
    honest = ForgetPeftModel.from_pretrained(tiny_clip(), directory)
    report = verify_forget_adapter(honest, tokenizer=tokenizer)
    assert report.ok and report.results[0].status == "match" and report.results[0].max_difference < 1e-6
    # an attacker who swaps the factors and recomputes the checksums passes the integrity check...
    replace_factor(directory, cat_factor)
    edit_config(directory, factor_checksums=lambda c: c.pop("factor_checksums"))
    tampered = ForgetPeftModel.from_pretrained(tiny_clip(), directory, trust_unverified=True)
    report = tampered.verify(tokenizer=tokenizer)
    # ...but not verification: the stored edit is not the edit of the classes its config and card name
    assert not report.ok
    assert (
        report.results[0].status == "mismatch" and report.results[0].max_difference > 100 * report.results[0].tolerance
    )
    assert "'dog'" in str(report) and "mismatch" in str(report)


def test_verify_covers_every_adapter_of_a_stack_and_every_method(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["dog"], tokenizer, target="both", retain_classes=["cat"],
                               show_progress=False)  # fmt: skip
    model.add_forget_adapter(["truck"], tokenizer=tokenizer, method="ccup", retain_classes=["car"],
                             show_progress=False)  # fmt: skip
    model.add_forget_adapter(text_embeds=torch.randn(1, 16), tokenizer=tokenizer, show_progress=False)
    report = model.verify(tokenizer=tokenizer)
    assert [r.status for r in report.results] == ["match", "match", "unverifiable"]
    assert report.to_dict()["adapters"][2]["adapter_name"] == "forget_2"


def test_plain_peft_loading_refuses_non_finite_factors_at_load_naming_the_adapter(saved):
    from peft import PeftModel

    directory, _ = saved
    broken = load_file(directory / WEIGHTS)[FACTOR_KEY].clone()
    broken[0, 0] = float("nan")
    replace_factor(directory, broken)
    with pytest.raises(ValueError, match="forget adapter 'default' contain NaN or inf"):
        PeftModel.from_pretrained(tiny_clip(), directory)


def test_a_local_save_records_the_local_base_only_in_its_config(tmp_path, tokenizer):
    from transformers import CLIPModel

    base_dir = tmp_path / "private" / "base"
    tiny_clip().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = add_forget_adapter(CLIPModel.from_pretrained(base_dir), ["dog"], show_progress=False)
    model.add_forget_adapter(["cat"], adapter_name="pets", show_progress=False)
    model.save_pretrained(tmp_path / "saved")  # peft fills an unset base_model_name_or_path while saving
    for path in (tmp_path / "saved").rglob("*"):
        if path.name == "adapter_config.json":  # as peft does, so that the base is found again
            assert json.loads(path.read_text())["base_model_name_or_path"] == str(base_dir), path
        elif path.is_file() and path.suffix in (".json", ".md"):
            assert str(base_dir) not in path.read_text(), path
