"""Issue 10 item 1: the layer's cached combined edit follows every change of its factors and settings.

Each test runs a forward first (which fills the cache), then changes the factors some way, and checks that the
outputs are those of the new factors.
"""

import copy
import pickle

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_tokenizer

from .conftest import image_features


PIXELS = random_pixels(batch_size=3)


def forget(classes, **options):
    return add_forget_adapter(tiny_clip(), classes, tokenizer=tiny_tokenizer(), show_progress=False, **options)


def layer_of(model):
    return model.base_model.model.visual_projection


@pytest.fixture(scope="module")
def reference():
    """The outputs of a fresh "dog" and a fresh "cat" adapter (they differ)."""
    dog, cat = image_features(forget(["dog"]), PIXELS), image_features(forget(["cat"]), PIXELS)
    assert not torch.allclose(dog, cat, atol=1e-4)
    return {"dog": dog, "cat": cat}


def assert_outputs(model, expected):
    torch.testing.assert_close(image_features(model, PIXELS), expected, rtol=0, atol=1e-6)


def test_load_state_dict_after_a_forward_applies_the_new_factors(reference):
    model, other = forget(["dog"]), forget(["cat"])
    assert_outputs(model, reference["dog"])
    model.load_state_dict(other.state_dict())
    assert_outputs(model, reference["cat"])


def test_new_factors_after_a_forward_take_effect(reference):
    model, other = forget(["dog"]), forget(["cat"])
    assert_outputs(model, reference["dog"])
    # a state dict carrying other factors than its config records is refused by the load gate (test_hostile_adapters);
    # the tuner's set_factors changes them and the record together
    model.base_model.set_factors(
        "default", {"visual_projection": (layer_of(other).projection_edit_forget["default"], None)}
    )
    assert_outputs(model, reference["cat"])
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))  # now the recorded factors: accepted
    assert_outputs(model, reference["cat"])


def test_load_adapter_into_the_existing_adapter_name_applies_the_loaded_factors(reference, tmp_path):
    model, other = forget(["dog"]), forget(["cat"])
    other.save_pretrained(tmp_path)
    assert_outputs(model, reference["dog"])
    model.load_adapter(str(tmp_path), adapter_name="default")
    assert_outputs(model, reference["cat"])
    assert model.peft_config["default"].forgotten_classes == ["cat"]  # the config says what the factors do


def test_an_in_place_change_of_a_factor_buffer_takes_effect(reference):
    model, other = forget(["dog"]), forget(["cat"])
    assert_outputs(model, reference["dog"])
    with torch.no_grad():
        layer_of(model).projection_edit_forget["default"].copy_(layer_of(other).projection_edit_forget["default"])
    assert_outputs(model, reference["cat"])


def test_a_changed_adapter_setting_takes_effect():
    model = forget(["dog"])
    before = image_features(model, PIXELS)
    layer = layer_of(model)
    settings = layer.projection_edit_settings["default"]
    layer.projection_edit_settings["default"] = type(settings)(**{**vars(settings), "alpha": 0.5})
    assert_outputs(model, image_features(forget(["dog"], alpha=0.5), PIXELS))
    assert not torch.allclose(image_features(model, PIXELS), before, atol=1e-4)


def test_load_state_dict_into_a_merged_model_applies_the_new_factors(reference):
    model, other = forget(["dog"]), forget(["cat"])
    model.merge_adapter()
    torch.testing.assert_close(image_features(model, PIXELS), reference["dog"], rtol=0, atol=1e-5)
    model.load_state_dict(other.state_dict())  # the unmerged checkpoint: base weight and "cat" factors
    torch.testing.assert_close(image_features(model, PIXELS), reference["cat"], rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert_outputs(model, reference["cat"])
    with model.disable_adapter():
        assert_outputs(model, image_features(tiny_clip(), PIXELS))


def test_reloading_a_merged_models_own_state_dict_changes_nothing(reference):
    model = forget(["dog"])
    model.merge_adapter()
    merged = image_features(model, PIXELS)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    torch.testing.assert_close(image_features(model, PIXELS), merged, rtol=0, atol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert_outputs(model, image_features(tiny_clip(), PIXELS))


def test_a_foreign_weight_loaded_into_a_merged_layer_is_refused_clearly():
    model = forget(["dog"])
    model.merge_adapter()
    image_features(model, PIXELS)
    weight = layer_of(model).get_base_layer().weight
    with torch.no_grad():
        weight.add_(1.0)  # neither the unedited nor the merged weight
    with pytest.raises(RuntimeError, match="merged"):
        image_features(model, PIXELS)


def test_a_deep_copy_made_after_a_forward_does_not_share_the_cached_edit(reference):
    model, other = forget(["dog"]), forget(["cat"])
    assert_outputs(model, reference["dog"])
    clone = copy.deepcopy(model)
    assert layer_of(clone)._edit_cache == {}
    clone.load_state_dict(other.state_dict())
    assert_outputs(clone, reference["cat"])
    assert_outputs(model, reference["dog"])
    with torch.no_grad():
        layer_of(model).projection_edit_forget["default"].copy_(layer_of(other).projection_edit_forget["default"])
    assert_outputs(model, reference["cat"])


def test_pickling_after_a_forward_drops_the_cache_and_keeps_the_edit(reference):
    model = forget(["dog"])
    assert_outputs(model, reference["dog"])
    restored = pickle.loads(pickle.dumps(model))
    assert layer_of(restored)._edit_cache == {}
    assert_outputs(restored, reference["dog"])
    model.merge_adapter()
    image_features(model, PIXELS)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(image_features(restored, PIXELS), reference["dog"], rtol=0, atol=1e-5)
    restored.unmerge_adapter()
    assert_outputs(restored, reference["dog"])


def test_factors_made_under_inference_mode_are_not_cached_stale():
    model, other, dog = forget(["dog"]), forget(["cat"]), forget(["dog"])
    layer = layer_of(model)
    with torch.inference_mode():
        layer.set_factors("default", layer_of(other).projection_edit_forget["default"].clone())
        first = image_features(model, PIXELS)
        layer.projection_edit_forget["default"].copy_(layer_of(dog).projection_edit_forget["default"])
        second = image_features(model, PIXELS)
    assert not torch.allclose(first, second, atol=1e-4)
