"""Where a saved forget adapter says its base model is: ``base_model_name_or_path`` (item 16).

One rule on every path (``hf_clip_forget.tuners.projection_edit.provenance``): a local save records where the base
was loaded from, a local directory included, as peft and LoRA do, so that transformers' ``CLIPModel.from_pretrained
(adapter_dir)`` and ``PeftModel.from_pretrained`` find it; a push to the Hub records the base's Hub id, or ``null``,
never a local path.
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import CLIPModel

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_tokenizer
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer


PIXELS = random_pixels(4)
HUB_ID = "openai/clip-vit-base-patch32"

# The transformers flow (`model.add_adapter(config)` then `model.save_pretrained`) saves the adapter config as the
# tuner built it, without peft's filling-in: the build records the base's `name_or_path` (`base_model_source`).


@pytest.fixture
def base_dir(tmp_path) -> str:
    """A tiny CLIP checkpoint, with its tokenizer, in a local directory."""
    directory = tmp_path / "private-models" / "clip"
    tiny_clip().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def image_features(model) -> torch.Tensor:
    with torch.no_grad():
        output = model.get_image_features(pixel_values=PIXELS)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def recorded_bases(directory) -> dict[str, object]:
    """Adapter folder (relative) → the ``base_model_name_or_path`` its ``adapter_config.json`` records."""
    return {
        str(path.parent.relative_to(directory)): json.loads(path.read_text())["base_model_name_or_path"]
        for path in sorted(directory.rglob("adapter_config.json"))
    }


def request(base_dir: str) -> ProjectionEditConfig:
    return ProjectionEditConfig(forgotten_classes=["dog"], tokenizer_name_or_path=base_dir)


# ------------------------------------------------------------------------------------- (a) the transformers flow
def test_transformers_add_adapter_save_and_from_pretrained_round_trip_with_a_local_base(base_dir, tmp_path):
    model = CLIPModel.from_pretrained(base_dir).eval()
    unedited = image_features(model)
    model.add_adapter(request(base_dir))
    edited = image_features(model)
    assert not torch.allclose(edited, unedited, atol=1e-4)  # the adapter forgets something
    model.save_pretrained(tmp_path / "adapter")
    assert recorded_bases(tmp_path / "adapter") == {".": base_dir}

    loaded = CLIPModel.from_pretrained(tmp_path / "adapter").eval()  # finds the base through the adapter config
    assert isinstance(loaded.visual_projection, ProjectionEditLayer)
    assert loaded.peft_config["default"].forgotten_classes == ["dog"]
    torch.testing.assert_close(image_features(loaded), edited, rtol=1e-5, atol=1e-5)

    through_peft = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir).eval(), tmp_path / "adapter")
    torch.testing.assert_close(image_features(through_peft), edited, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- (b) every local save, the same value
def save_through_transformers(base_dir, directory):
    model = CLIPModel.from_pretrained(base_dir)
    model.add_adapter(request(base_dir))
    model.save_pretrained(directory)


def save_through_get_peft_model(base_dir, directory):
    get_peft_model(CLIPModel.from_pretrained(base_dir), request(base_dir)).save_pretrained(directory)


def save_through_add_forget_adapter(base_dir, directory):
    model = add_forget_adapter(CLIPModel.from_pretrained(base_dir), ["dog"], templates="single", show_progress=False)
    model.add_forget_adapter(["cat"], adapter_name="pets", templates="single", show_progress=False)  # a subfolder
    model.save_pretrained(directory)


def save_again_after_loading(base_dir, directory):
    save_through_add_forget_adapter(base_dir, directory.parent / "first")
    ForgetPeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), directory.parent / "first").save_pretrained(
        directory
    )


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(save_through_transformers, id="transformers"),
        pytest.param(save_through_get_peft_model, id="get_peft_model"),
        pytest.param(save_through_add_forget_adapter, id="ForgetPeftModel"),
        pytest.param(save_again_after_loading, id="ForgetPeftModel-loaded"),
    ],
)
def test_every_local_save_records_the_local_directory_of_the_base(save, base_dir, tmp_path):
    save(base_dir, tmp_path / "adapter")
    recorded = recorded_bases(tmp_path / "adapter")
    assert recorded and set(recorded.values()) == {base_dir}, recorded


def test_a_saved_adapter_loads_onto_the_base_its_config_names(base_dir, tmp_path):
    model = add_forget_adapter(CLIPModel.from_pretrained(base_dir).eval(), ["dog"], show_progress=False)
    edited = image_features(model)
    model.save_pretrained(tmp_path / "adapter")
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    loaded = ForgetPeftModel.from_pretrained(CLIPModel.from_pretrained(named).eval(), tmp_path / "adapter")
    torch.testing.assert_close(image_features(loaded), edited, rtol=1e-5, atol=1e-5)


def test_a_base_built_in_memory_is_recorded_as_null(tmp_path, tokenizer):
    model = add_forget_adapter(tiny_clip(), ["dog"], tokenizer=tokenizer, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")
    assert recorded_bases(tmp_path / "adapter") == {".": None}


# ------------------------------------------------------------------------------- (c) a push never names the path
def pushed_configs(fake_hub, repo_id: str) -> dict[str, object]:
    return {
        path: json.loads(data)["base_model_name_or_path"]
        for path, data in fake_hub.repos[repo_id].items()
        if path.endswith("adapter_config.json")
    }


def pushed_text(fake_hub, repo_id: str) -> str:
    return "\n".join(
        data.decode("utf-8", "replace")
        for path, data in fake_hub.repos[repo_id].items()
        if not path.endswith(".safetensors")
    )


def test_a_push_of_a_stack_on_a_local_base_records_null_while_local_saves_keep_the_path(fake_hub, base_dir, tmp_path):
    model = add_forget_adapter(CLIPModel.from_pretrained(base_dir), ["dog"], show_progress=False)
    model.add_forget_adapter(["cat"], adapter_name="pets", show_progress=False)
    model.push_to_hub("tester/local-base-stack")
    assert pushed_configs(fake_hub, "tester/local-base-stack") == {
        "adapter_config.json": None,
        "pets/adapter_config.json": None,
    }
    assert "private-models" not in pushed_text(fake_hub, "tester/local-base-stack")
    model.save_pretrained(tmp_path / "after-push")  # the push changed only the uploaded copy
    assert set(recorded_bases(tmp_path / "after-push").values()) == {base_dir}


def test_a_push_of_an_adapter_loaded_from_a_local_save_records_null(fake_hub, base_dir, tmp_path):
    add_forget_adapter(CLIPModel.from_pretrained(base_dir), ["dog"], show_progress=False).save_pretrained(
        tmp_path / "adapter"
    )
    assert recorded_bases(tmp_path / "adapter") == {".": base_dir}
    loaded = ForgetPeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), tmp_path / "adapter")
    loaded.push_to_hub("tester/reloaded-local-base")
    assert pushed_configs(fake_hub, "tester/reloaded-local-base") == {"adapter_config.json": None}
    assert "private-models" not in pushed_text(fake_hub, "tester/reloaded-local-base")


def test_a_base_with_a_hub_id_is_recorded_by_it_locally_and_on_the_hub(fake_hub, tokenizer, tmp_path):
    base = tiny_clip()
    base.name_or_path = HUB_ID
    model = add_forget_adapter(base, ["dog"], tokenizer=tokenizer, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")
    assert recorded_bases(tmp_path / "adapter") == {".": HUB_ID}
    model.push_to_hub("tester/hub-base")
    assert pushed_configs(fake_hub, "tester/hub-base") == {"adapter_config.json": HUB_ID}
