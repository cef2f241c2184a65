"""Adapter names are untrusted text that becomes a folder, a Hub path and a key of the adapter's weights: a bad one is
refused with one ValueError naming it and the allowed form, before the model is touched."""

import pytest
import torch

from hf_clip_forget import ForgetPeftModel, add_forget_adapter
from hf_clip_forget.testing_utils import random_pixels, tiny_clip
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer
from hf_clip_forget.tuners.projection_edit.names import MAX_ADAPTER_NAME_LENGTH, check_adapter_name


TEMPLATES = ["a photo of a {}."]
ALLOWED = r"1 to 96 characters: ASCII letters, digits, '_' and '-'"
BAD_NAMES = [
    pytest.param("dog\x00s", id="nul-byte"),
    pytest.param("x" * 10_000, id="10kB"),
    pytest.param("dogs\nand cats", id="newline"),
    pytest.param("---", id="yaml-rule"),
    pytest.param("-dogs", id="leading-dash"),
    pytest.param("../x", id="parent-dir"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a..b", id="dot-dot"),
    pytest.param("v1.2", id="dot"),  # torch refuses '.' in buffer names, and it would split state-dict keys
    pytest.param("", id="empty"),
    pytest.param(" ", id="space"),
    pytest.param("café", id="non-ascii"),
    pytest.param("CON", id="windows-device"),
    pytest.param("nul", id="windows-device-lower"),
    pytest.param("visual_projection", id="module-on-the-key-path"),
    pytest.param("projection_edit_forget", id="buffer-on-the-key-path"),
    pytest.param(7, id="int"),
    pytest.param(b"dogs", id="bytes"),
    pytest.param(["dogs"], id="list"),
]
GOOD_NAMES = ["default", "dogs", "no-cat", "v1_2", "_private", "Forget2", "c", "A" * MAX_ADAPTER_NAME_LENGTH]


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_before_a_base_model_is_modified(tokenizer, name):
    model = tiny_clip()
    before = state(model)
    with pytest.raises(ValueError, match=r"`adapter_name` .* is not allowed: .*" + ALLOWED) as error:
        add_forget_adapter(model, ["cat"], tokenizer, adapter_name=name, templates=TEMPLATES, show_progress=False)
    assert len(str(error.value)) < 500  # the name is shown, shortened: never 10 kB of message
    assert_same_state(model, before)
    assert not any(isinstance(module, ProjectionEditLayer) for module in model.modules())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_before_a_stack_is_modified(tokenizer, name):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, templates=TEMPLATES, show_progress=False)
    before, names = state(model), list(model.peft_config)
    with pytest.raises(ValueError, match=r"`adapter_name` .* is not allowed"):
        model.add_forget_adapter(["dog"], tokenizer=tokenizer, adapter_name=name, templates=TEMPLATES)
    assert list(model.peft_config) == names
    assert_same_state(model, before)


def test_the_message_names_the_bad_name_and_shortens_a_long_one():
    with pytest.raises(ValueError, match=r"`adapter_name` 'dog\\x00s' is not allowed: it contains '\\x00'"):
        check_adapter_name("dog\x00s")
    with pytest.raises(ValueError, match=r"'xxxx.*… \(10000 characters\) is not allowed: it has 10000 characters"):
        check_adapter_name("x" * 10_000)
    with pytest.raises(ValueError, match="it is a int, not a string"):
        check_adapter_name(7)
    with pytest.raises(ValueError, match="it starts with '-'"):
        check_adapter_name("---")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_ordinary_names_are_accepted(name):
    assert check_adapter_name(name) == name


def test_ordinary_names_build_stack_save_and_load(tokenizer, tmp_path):
    model = add_forget_adapter(
        tiny_clip(), ["cat"], tokenizer, adapter_name="dogs", templates=TEMPLATES, show_progress=False
    )
    for name, classes in (("no-cat", ["bird"]), ("v1_2", ["ship"]), ("A" * MAX_ADAPTER_NAME_LENGTH, ["car"])):
        model.add_forget_adapter(classes, tokenizer=tokenizer, adapter_name=name, templates=TEMPLATES)
    model.base_model.set_adapter(list(model.peft_config))
    pixels = random_pixels()
    expected = model.get_image_features(pixel_values=pixels)
    model.save_pretrained(tmp_path)
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path, adapter_name="dogs")
    assert sorted(loaded.peft_config) == sorted(model.peft_config)
    loaded.base_model.set_adapter(list(loaded.peft_config))
    found = loaded.get_image_features(pixel_values=pixels)
    expected, found = (getattr(x, "pooler_output", x) for x in (expected, found))
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-6)
