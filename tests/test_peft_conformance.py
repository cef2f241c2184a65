"""The generic behaviours peft checks for every method (``PeftCommonTester`` in peft's tests/testing_common.py),
checked for forget adapters on a tiny random CLIPModel.

Where a generic behaviour cannot apply to a closed-form, non-trainable edit (training, ``modules_to_save``,
mixed-adapter batches), the test asserts a clear refusal instead.
"""

import copy
import os
import pickle
import warnings

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_tokenizer
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer


TOKENIZER = tiny_tokenizer()
TEXT = TOKENIZER(["a photo of a dog.", "a photo of a cat.", "a photo of a ship."], padding=True, return_tensors="pt")
INPUTS = {"input_ids": TEXT["input_ids"], "attention_mask": TEXT["attention_mask"], "pixel_values": random_pixels(4)}
ALREADY_MERGED = "All adapters are already merged, nothing to do"
PREFIX_WARNING = "should not be contained in the prefix"


def forget(classes=("dog",), model=None, **options):
    """A forget adapter on a fresh tiny CLIP (both projections edited, so that every output depends on it)."""
    options.setdefault("target", "both")
    options.setdefault("templates", "single")  # the generic behaviours do not depend on the template ensemble
    # tests compare independently built adapters bit for bit: encode every prompt anew (a cached embedding may come
    # from a batch of other prompts, equal only to rounding)
    options.setdefault("use_cache", False)
    return add_forget_adapter(
        model if model is not None else tiny_clip(), list(classes), tokenizer=TOKENIZER, show_progress=False, **options
    )


def outputs(model, inputs=INPUTS) -> torch.Tensor:
    """Image embeddings, text embeddings and logits of one forward, flattened into one tensor."""
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten(), out.logits_per_image.flatten()])


def assert_close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def assert_differs(actual, expected):
    assert not torch.allclose(actual.float(), expected.float(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base_output():
    return outputs(tiny_clip())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved "dog" adapter and a saved "cat" adapter, with the outputs of the models that saved them."""
    root = tmp_path_factory.mktemp("saved")
    result = {}
    for classes in (["dog"], ["cat"]):
        model = forget(classes)
        model.save_pretrained(root / classes[0])
        result[classes[0]] = (str(root / classes[0]), outputs(model))
    return result


def assert_same_state(loaded, model):
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)


def tuner_layers(model):
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def test_model_has_peft_attributes_and_adapter_named_buffers():
    model = forget(adapter_name="test-adapter")
    assert all(hasattr(model, name) for name in ("save_pretrained", "from_pretrained", "push_to_hub"))
    assert any("test-adapter" in name for name, _ in model.named_buffers())


# ------------------------------------------------------------------------------------------------------------ merge
def test_merge_layers(tmp_path, base_output):
    model = forget()
    edited = outputs(model)
    assert_differs(edited, base_output)
    model.merge_adapter()
    assert_close(outputs(model), edited)
    model.unmerge_adapter()
    assert_close(outputs(model), edited)
    merged = model.merge_and_unload()
    assert not tuner_layers(merged) and not hasattr(merged, "peft_config")
    assert_close(outputs(merged), edited)
    merged.save_pretrained(tmp_path)
    assert_close(outputs(CLIPModel.from_pretrained(tmp_path).eval()), edited)
    assert_close(outputs(pickle.loads(pickle.dumps(merged))), edited)


def test_safe_merge_gives_the_same_outputs_and_a_serialisable_state_dict(tmp_path):
    model = forget()
    edited = outputs(model)
    unloaded = model.merge_and_unload(safe_merge=True)
    assert_close(outputs(unloaded), edited)
    torch.save(unloaded.state_dict(), tmp_path / "model.bin")
    save_file(unloaded.state_dict(), tmp_path / "model.safetensors")


def test_merging_broken_factors_raises_and_leaves_the_model_as_it_was():
    model = forget()
    layer = model.base_model.model.visual_projection
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.projection_edit_forget["default"][0, 0] = torch.nan
    with pytest.raises(ValueError, match="NaN.*default|default.*NaN"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.visual_projection, ProjectionEditLayer) and not layer.merged
    assert torch.equal(layer.get_base_layer().weight, weight)


def test_a_merge_whose_weight_overflows_raises_with_pefts_message():
    model = forget(model=tiny_clip(dtype=torch.float16))
    layer = model.base_model.model.visual_projection
    with torch.no_grad():
        layer.get_base_layer().weight.fill_(60000.0)  # finite in float16; the edit takes some entries past 65504
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        layer.merge()
    assert not layer.merged


def test_merging_twice_changes_nothing_and_warns_like_peft():
    model = forget()
    model.merge_adapter()
    merged = outputs(model)
    with pytest.warns(UserWarning, match=ALREADY_MERGED):
        model.merge_adapter()
    assert_close(outputs(model), merged, tol=0)


def test_merging_a_merged_layer_again_warns_like_peft_and_changes_nothing():
    layer = forget().base_model.model.visual_projection
    layer.merge()
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.warns(UserWarning, match=ALREADY_MERGED):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, weight) and layer.merged_adapters == ["default"]


def test_unmerging_what_is_not_merged_warns_on_a_layer_and_raises_on_the_model():
    model = forget()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        model.base_model.model.visual_projection.unmerge()
    with pytest.raises(ValueError, match="nothing to unmerge"):
        model.unmerge_adapter()


# ------------------------------------------------------------------------------------------------ delete / unload
def _assert_adapter_gone(model, name):
    assert name not in model.peft_config
    for layer in tuner_layers(model):
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            assert name not in getattr(layer, attribute), f"{attribute} still holds {name!r}"


def test_delete_the_active_adapter(base_output):
    model = forget()
    dog_only = outputs(model)
    model.add_forget_adapter(
        ["cat"], tokenizer=TOKENIZER, adapter_name="delete_me", show_progress=False, target="both"
    )
    model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    _assert_adapter_gone(model, "delete_me")
    assert model.active_adapters == ["default"]
    assert_close(outputs(model), dog_only)
    model.delete_adapter("default")
    _assert_adapter_gone(model, "default")
    assert model.active_adapters == []
    with torch.no_grad():
        out = model.base_model(**INPUTS)  # PeftModel itself expects an adapter, as in peft's test
    assert_close(torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten(), out.logits_per_image.flatten()]),
                 base_output)  # fmt: skip


def test_delete_an_inactive_adapter():
    model = forget()
    dog_only = outputs(model)
    model.add_forget_adapter(
        ["cat"], tokenizer=TOKENIZER, adapter_name="delete_me", show_progress=False, target="both"
    )
    model.set_adapter("default")
    model.delete_adapter("delete_me")
    _assert_adapter_gone(model, "delete_me")
    assert model.active_adapters == ["default"]
    assert_close(outputs(model), dog_only)


def test_delete_an_unknown_adapter_raises():
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        forget().delete_adapter("unknown-adapter")


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_the_base_output_and_restores_the_edit(base_output, merged):
    model = forget()
    edited = outputs(model)
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        assert_close(outputs(model), base_output, tol=1e-6)
    assert_close(outputs(model), edited, tol=1e-6)


@pytest.mark.parametrize("merged", [False, True])
def test_unload_gives_back_the_base_model(base_output, merged):
    keys = len(tiny_clip().state_dict())
    model = forget()
    assert_differs(outputs(model), base_output)
    if merged:
        model.merge_adapter()
    unloaded = model.unload()
    assert not tuner_layers(unloaded) and not hasattr(unloaded, "peft_config")
    assert len(unloaded.state_dict()) == keys
    assert_close(outputs(unloaded), base_output, tol=0)


def test_get_and_set_base_model_state_dict():
    from peft import get_base_model_state_dict, set_base_model_state_dict

    original = tiny_clip().state_dict()
    model = forget()
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    assert all(torch.equal(extracted[key], value) for key, value in original.items())
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(0.1)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(get_base_model_state_dict(model)[key], value) for key, value in original.items())


# ----------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_pretrained_and_load_with_peft(tmp_path, safe_serialization):
    model = forget()
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / weights).exists() and (tmp_path / "adapter_config.json").exists()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert not any("Found missing adapter keys" in str(record.message) for record in records)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    assert_close(outputs(loaded), outputs(model), tol=0)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_pretrained_selected_adapters(tmp_path, safe_serialization):
    model = forget()
    model.add_forget_adapter(
        ["cat"], tokenizer=TOKENIZER, adapter_name="new_adapter", show_progress=False, target="both"
    )
    model.save_pretrained(tmp_path / "all", safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / "all" / weights).exists() and (tmp_path / "all" / "new_adapter" / weights).exists()
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "all")
    assert_same_state(loaded, model)
    assert_close(outputs(loaded), outputs(model), tol=0)
    # plain peft loads the root adapter only: the whole stack, or a clear refusal, never a part of it silently
    try:
        partial = PeftModel.from_pretrained(tiny_clip(), tmp_path / "all")
    except ValueError as error:
        assert "stack" in str(error)
    else:
        assert set(partial.peft_config) == {"default", "new_adapter"}
        assert_close(outputs(partial), outputs(model), tol=0)

    model.save_pretrained(tmp_path / "one", selected_adapters=["default"], safe_serialization=safe_serialization)
    only = PeftModel.from_pretrained(tiny_clip(), tmp_path / "one")
    assert list(only.peft_config) == ["default"]
    assert not (tmp_path / "one" / "new_adapter").exists()
    model.set_adapter("default")
    assert_close(outputs(only), outputs(model), tol=0)


def test_save_selected_adapter_whose_name_is_a_substring_of_others(tmp_path):
    model = forget()
    expected = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_forget_adapter(["cat"], tokenizer=TOKENIZER, adapter_name=name, show_progress=False, target="both")
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


def test_from_pretrained_with_a_config_object(tmp_path):
    model = forget()
    model.save_pretrained(tmp_path)
    config = ProjectionEditConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    assert_close(outputs(loaded), outputs(model), tol=0)


def test_load_several_adapters_under_new_names(saved):
    path, dog = saved["dog"]
    model = PeftModel.from_pretrained(tiny_clip(), path)
    for name in ("other", "yet-another"):
        assert model.load_adapter(path, adapter_name=name).missing_keys == []
    for name in ("default", "other", "yet-another"):
        model.set_adapter(name)
        assert_close(outputs(model), dog, tol=0)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_with_low_cpu_mem_usage(saved, low_cpu_mem_usage):
    (dog_path, dog), (cat_path, cat) = saved["dog"], saved["cat"]
    model = PeftModel.from_pretrained(tiny_clip(), dog_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_close(outputs(model), dog, tol=0)
    model.load_adapter(cat_path, adapter_name="cat", low_cpu_mem_usage=low_cpu_mem_usage)
    model.set_adapter("cat")
    assert_close(outputs(model), cat, tol=0)


def take_factors(model, other) -> None:
    """Give ``model``'s adapter the factors of ``other``'s through the tuner (which records their checksums)."""
    layers = other.base_model.forget_layers()
    model.base_model.set_factors(
        "default", {name: (layer.projection_edit_forget["default"], None) for name, layer in layers.items()}
    )


def test_state_dict_round_trip_after_a_forward(saved):
    (_, dog), (cat_path, cat) = saved["dog"], saved["cat"]
    model = forget(["dog"])
    assert_close(outputs(model), dog, tol=0)
    set_peft_model_state_dict(model, get_peft_model_state_dict(forget(["dog"])))  # its own factors: accepted
    assert_close(outputs(model), dog, tol=0)
    # another adapter's factors under this config ("dog") would make the config lie: refused, nothing copied
    other = PeftModel.from_pretrained(tiny_clip(), cat_path)
    with pytest.raises(ValueError, match="do not match the checksums recorded in its config"):
        set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    assert_close(outputs(model), dog, tol=0)
    take_factors(model, other)  # the library's own way to change factors keeps the config in step
    assert_close(outputs(model), cat, tol=0)
    model.load_state_dict(forget(["dog"]).state_dict())
    assert_close(outputs(model), dog, tol=0)


def test_load_adapter_into_an_existing_name_applies_the_loaded_config_or_refuses(tmp_path):
    half = forget(["dog"], alpha=0.5)
    half.save_pretrained(tmp_path)
    model = forget(["dog"])
    outputs(model)
    try:
        model.load_adapter(str(tmp_path), adapter_name="default")
    except ValueError:
        return  # a clear refusal is acceptable
    assert_close(outputs(model), outputs(half), tol=1e-6)


# ----------------------------------------------------------------------------------------------- copies and compile
def test_deepcopy_and_pickle_give_independent_equal_models(saved):
    (_, dog), (cat_path, cat) = saved["dog"], saved["cat"]
    model = forget(["dog"])
    assert_close(outputs(model), dog, tol=0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_close(outputs(clone), dog, tol=0)
        take_factors(clone, PeftModel.from_pretrained(tiny_clip(), cat_path))
        assert_close(outputs(clone), cat, tol=0)
        assert_close(outputs(model), dog, tol=0)


def test_torch_compile_gives_the_eager_outputs_and_follows_new_factors(saved):
    """The forget layer compiled with dynamo (``backend="eager"``: it traces the layer's Python, its cache look-ups
    and version checks, without the cost of generating kernels on a 2-core CI machine)."""
    torch._dynamo.reset()
    model, cat = forget(["dog"]), PeftModel.from_pretrained(tiny_clip(), saved["cat"][0])
    layer, cat_layer = model.base_model.model.visual_projection, cat.base_model.model.visual_projection
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        assert_close(compiled(x), layer(x), tol=1e-6)
        take_factors(model, cat)
        assert_close(compiled(x), cat_layer(x), tol=1e-6)
        layer.merge()
        assert_close(compiled(x), cat_layer(x), tol=1e-5)


# ------------------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_model_dtype_and_float32_factors(dtype):
    reference = outputs(forget(["dog"]))
    model = forget(["dog"], model=tiny_clip(dtype=dtype))
    factors = [buffer for name, buffer in model.named_buffers() if "projection_edit_forget" in name]
    assert factors and all(factor.dtype == torch.float32 for factor in factors)
    edited = outputs(model)
    assert edited.dtype == dtype
    assert_close(edited, reference, tol=0.15)  # logits amplify the rounding of half-precision towers
    model.merge_adapter()
    assert model.base_model.model.visual_projection.get_base_layer().weight.dtype == dtype
    assert_close(outputs(model), edited, tol=0.02)
    unloaded = model.merge_and_unload()
    assert unloaded.visual_projection.weight.dtype == dtype
    assert_close(outputs(unloaded), edited, tol=0.02)


def test_moving_a_model_to_half_precision_keeps_the_factors_float32():
    model = forget(["dog"]).to(torch.bfloat16)
    factors = [buffer for name, buffer in model.named_buffers() if "projection_edit_" in name]
    assert factors and all(factor.dtype == torch.float32 for factor in factors)
    assert outputs(model).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- transformers' adapter API
def test_transformers_adapter_api_works_with_the_installed_peft(saved, base_output):
    """``transformers`` 5.24 needs peft >= 0.22 for everything but ``load_adapter``: setup.cfg must not allow a
    transformers whose adapter API the allowed peft cannot serve."""
    (dog_path, dog), (cat_path, cat) = saved["dog"], saved["cat"]
    model = tiny_clip()
    model.load_adapter(dog_path)
    assert isinstance(model.visual_projection, ProjectionEditLayer)
    assert_close(outputs(model), dog, tol=0)
    assert model.active_adapters() == ["default"]
    model.disable_adapters()
    assert_close(outputs(model), base_output, tol=0)
    model.enable_adapters()
    assert_close(outputs(model), dog, tol=0)
    model.load_adapter(cat_path, adapter_name="cat")
    model.set_adapter("cat")
    assert model.active_adapters() == ["cat"]
    assert_close(outputs(model), cat, tol=0)
    model.delete_adapter("cat")
    model.set_adapter("default")
    assert_close(outputs(model), dog, tol=0)


# ------------------------------------------------------------------------------- what a closed-form edit refuses
def test_nothing_is_trainable_and_gradients_flow_through_the_edit():
    model = forget()
    assert model.get_nb_trainable_parameters()[0] == 0
    assert not any(param.requires_grad for param in model.parameters())
    # the edit is differentiable: fine-tuning a tower under an adapter sees the edited embeddings' gradients
    model.get_base_model().vision_model.post_layernorm.weight.requires_grad_(True)
    out = model(**INPUTS)
    out.image_embeds.sum().backward()
    assert model.get_base_model().vision_model.post_layernorm.weight.grad is not None


def test_modules_to_save_is_refused():
    with pytest.raises(ValueError, match="modules_to_save"):
        ProjectionEditConfig(modules_to_save=["classifier"])


def test_loading_as_trainable_is_refused(saved):
    with pytest.raises(ValueError, match="train"):
        PeftModel.from_pretrained(tiny_clip(), saved["dog"][0], is_trainable=True)


def test_a_layer_refuses_adapter_names():
    layer = forget().base_model.model.visual_projection
    with pytest.raises(ValueError, match="whole batch"):
        layer(torch.randn(2, layer.in_features), adapter_names=["default", "default"])


def test_forward_refuses_mixed_adapter_batches():
    model = forget()
    with pytest.raises(ValueError, match="whole batch"):
        model(**INPUTS, adapter_names=["default"] * len(INPUTS["pixel_values"]))


def test_feature_methods_refuse_mixed_adapter_batches():
    model = forget()
    with pytest.raises(ValueError, match="whole batch"):
        model.get_image_features(pixel_values=INPUTS["pixel_values"], adapter_names=["default"] * 4)
    with pytest.raises(ValueError, match="whole batch"):
        model.get_text_features(input_ids=INPUTS["input_ids"], adapter_names=["default"] * 3)


# ------------------------------------------------------------------------------------------------ adapter names
@pytest.mark.parametrize("name", ["c", "edit"])
@pytest.mark.filterwarnings("ignore:Adapter name .* should not be contained in the prefix")  # plain peft's own load
def test_short_adapter_names_round_trip(tmp_path, name):
    """peft warns when an adapter name is a substring of the method's prefix (``projection_edit_``), for fear of a
    wrong key mapping on load; peft 0.21 maps keys structurally, so such names save and load exactly."""
    model = forget(adapter_name=name)
    model.add_forget_adapter(["cat"], tokenizer=TOKENIZER, adapter_name="e", show_progress=False, target="both")
    model.save_pretrained(tmp_path)  # peft writes adapters not named "default" into subfolders
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / name, adapter_name=name)
    loaded.load_adapter(str(tmp_path / "e"), adapter_name="e")
    loaded.base_model.set_adapter([name, "e"])
    assert_same_state(loaded, model)
    assert_close(outputs(loaded), outputs(model), tol=0)


def test_short_adapter_names_do_not_trigger_pefts_prefix_warning(tmp_path):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model = forget(adapter_name="c")
        model.add_forget_adapter(["cat"], tokenizer=TOKENIZER, adapter_name="edit", show_progress=False)
        model.add_forget_adapter(["ship"], tokenizer=TOKENIZER, adapter_name="e", show_progress=False)
        model.save_pretrained(tmp_path)
        ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert not [str(r.message) for r in records if PREFIX_WARNING in str(r.message)]
    assert os.path.isdir(tmp_path / "edit")
