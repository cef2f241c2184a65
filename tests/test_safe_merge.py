"""Merging an adapter whose merged weights would hold NaN or inf raises peft's error (item 17).

peft's generic test (``PeftCommonTester._test_merge_layers_nan`` in peft's tests/testing_common.py) writes NaN, then
inf, into the first row of every adapter tensor and expects ``merge_and_unload(safe_merge=True)`` to raise
``ValueError("NaNs detected in the merged weights. The adapter default seems to be broken")``, LoRA's message. Here
every merge path raises it, with or without ``safe_merge``, before anything is written: the model's state is the
same afterwards, bit for bit.
"""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.testing_utils import random_pixels, tiny_clip
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer


PEFT_MESSAGE = r"^NaNs detected in the merged weights\. The adapter {} seems to be broken"
PIXELS = random_pixels(4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CLIP checkpoint with its tokenizer, as a peft test loads its model."""
    from hf_clip_forget.testing_utils import tiny_tokenizer

    directory = tmp_path_factory.mktemp("checkpoint")
    tiny_clip().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def forget(tokenizer, classes=("dog",), model=None, **options):
    options = {"target": "both", "templates": "single", "use_cache": False, "show_progress": False, **options}
    model = model if model is not None else tiny_clip()
    return add_forget_adapter(model, list(classes), tokenizer=tokenizer, **options)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    """The state is the one of ``before``, bit for bit, NaN and inf where they were."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        now = after[key].detach()
        assert now.dtype == value.dtype and torch.equal(now.isnan(), value.isnan()), key
        assert torch.equal(now.nan_to_num(0.0), value.nan_to_num(0.0)), key


def assert_nothing_merged(model) -> None:
    layers = [module for module in model.modules() if isinstance(module, ProjectionEditLayer)]
    assert layers and not any(layer.merged for layer in layers)


# ------------------------------------------------------------------------------------------------ peft's own test
def test_pefts_generic_nan_test(checkpoint):
    """``_test_merge_layers_nan``, on the peft entry point. The factors of a forget adapter are buffers (nothing is
    trainable), so "every adapter tensor" is every buffer under the method's prefix."""
    from transformers import CLIPModel

    config = ProjectionEditConfig(forgotten_classes=["dog"], tokenizer_name_or_path=checkpoint)
    model = get_peft_model(CLIPModel.from_pretrained(checkpoint).eval(), copy.deepcopy(config))
    unmerged = model.get_image_features(pixel_values=PIXELS)
    merged = model.merge_and_unload().get_image_features(pixel_values=PIXELS)
    torch.testing.assert_close(getattr(merged, "pooler_output", merged), getattr(unmerged, "pooler_output", unmerged))

    model = get_peft_model(CLIPModel.from_pretrained(checkpoint).eval(), copy.deepcopy(config))
    assert not [name for name, _ in model.named_parameters() if model.prefix in name]
    factors = [tensor for name, tensor in model.named_buffers() if model.prefix in name]
    assert factors
    for value in (torch.nan, torch.inf):
        for tensor in factors:
            tensor.data[0] = value
        before = snapshot(model)
        with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
            model = model.merge_and_unload(safe_merge=True)
        assert isinstance(model, PeftModel)
        assert_same_state(model, before)
        assert_nothing_merged(model)


# ------------------------------------------------------------------------------------------ every path, every cause
def _forget_factor(value):
    def corrupt(model):
        layer = model.base_model.model.visual_projection
        layer.projection_edit_forget["default"][0] = value
        return layer

    return corrupt


def _retain_factor(model):
    layer = model.base_model.model.visual_projection
    layer.projection_edit_retain["default"][0] = torch.nan
    return layer


def _text_factor(model):
    layer = model.base_model.model.text_projection
    layer.projection_edit_forget["default"][:, 0] = torch.nan
    return layer


def _base_weight(model):
    layer = model.base_model.model.visual_projection
    layer.get_base_layer().weight[0, 0] = torch.nan
    return layer


def _base_bias(model):
    layer = model.base_model.model.visual_projection
    layer.get_base_layer().bias[0] = torch.inf
    return layer


CAUSES = {
    "forget-factor-nan": (_forget_factor(torch.nan), {}),
    "forget-factor-inf": (_forget_factor(torch.inf), {}),
    "retain-factor-nan": (_retain_factor, {"method": "ccup", "retain_classes": ["cat", "ship"]}),
    "text-side-factor": (_text_factor, {}),
    "base-weight-nan": (_base_weight, {}),
    "base-bias-inf": (_base_bias, {"bias": True}),
}


def _save_merged(model, layer, tmp_path):
    model.save_merged_pretrained(tmp_path / "merged")


MERGES = {
    "merge_and_unload(safe_merge=True)": lambda model, layer, tmp_path: model.merge_and_unload(safe_merge=True),
    "merge_and_unload()": lambda model, layer, tmp_path: model.merge_and_unload(),
    "merge_adapter(safe_merge=True)": lambda model, layer, tmp_path: model.merge_adapter(safe_merge=True),
    "merge_adapter()": lambda model, layer, tmp_path: model.merge_adapter(),
    "layer.merge(safe_merge=True)": lambda model, layer, tmp_path: layer.merge(safe_merge=True),
    "save_merged_pretrained": _save_merged,
}


def corrupted(tokenizer, cause: str):
    """A "dog" adapter on a tiny CLIP, then the cause of NaN/inf; returns the model and the layer it hit."""
    corrupt, options = CAUSES[cause]
    options = dict(options)
    base = tiny_clip()
    if options.pop("bias", False):  # CLIP's projections have no bias: give the image one a bias to merge
        torch.manual_seed(3)
        base.visual_projection = nn.Linear(32, 16, bias=True)
    model = forget(tokenizer, model=base, **options)
    with torch.no_grad():
        layer = corrupt(model)
    return model, layer


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("cause", list(CAUSES))
def test_every_merge_path_raises_pefts_error_and_changes_nothing(tokenizer, tmp_path, cause, merge):
    model, layer = corrupted(tokenizer, cause)
    before = snapshot(model)
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        MERGES[merge](model, layer, tmp_path)
    assert_same_state(model, before)
    assert_nothing_merged(model)
    assert isinstance(model.base_model.model.visual_projection, ProjectionEditLayer)
    assert not (tmp_path / "merged").exists()  # nothing written


def test_the_broken_adapter_of_a_stack_is_named_and_none_is_merged(tokenizer):
    model = forget(tokenizer)
    model.add_forget_adapter(["truck"], tokenizer=tokenizer, adapter_name="vehicles", target="both",
                             templates="single", use_cache=False, show_progress=False)  # fmt: skip
    with torch.no_grad():
        model.base_model.model.visual_projection.projection_edit_forget["vehicles"][0] = torch.nan
    before = snapshot(model)
    for merge in (model.merge_adapter, lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=PEFT_MESSAGE.format("vehicles")):
            merge()
        assert_same_state(model, before)
        assert_nothing_merged(model)  # text_projection, healthy, was not merged either


@pytest.mark.parametrize("loader", [ForgetPeftModel.from_pretrained, PeftModel.from_pretrained])
def test_an_adapter_broken_after_loading_raises_pefts_error(tokenizer, tmp_path, loader):
    forget(tokenizer).save_pretrained(tmp_path / "adapter")
    model = loader(tiny_clip(), str(tmp_path / "adapter"))
    with torch.no_grad():
        model.base_model.model.visual_projection.get_base_layer().weight[0] = torch.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        model.merge_and_unload(safe_merge=True)
    assert_same_state(model, before)
    with torch.no_grad():
        model.base_model.model.visual_projection.get_base_layer().weight[0] = 0.0
        model.base_model.model.text_projection.projection_edit_forget["default"][0] = torch.inf
    before = snapshot(model)
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        model.merge_adapter(safe_merge=True)
    assert_same_state(model, before)
    assert_nothing_merged(model)


def test_factors_broken_after_a_merge_are_refused_by_the_forward_and_by_a_merged_save(tokenizer, tmp_path):
    model = forget(tokenizer)
    model.merge_adapter()
    with torch.no_grad():
        model.base_model.model.visual_projection.projection_edit_forget["default"][0] = torch.nan
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        model.get_image_features(pixel_values=PIXELS)
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        model.save_merged_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# `_unload_and_optionally_merge` (model.py) merges only what is not merged yet, so a layer merged before its factors
# broke is unloaded with the weight of the old factors. It raises once model.py checks merged layers first.
def test_factors_broken_after_a_merge_are_refused_by_merge_and_unload(tokenizer):
    model = forget(tokenizer)
    model.merge_adapter()
    with torch.no_grad():
        model.base_model.model.visual_projection.projection_edit_forget["default"][0] = torch.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=PEFT_MESSAGE.format("default")):
        model.merge_and_unload(safe_merge=True)
    assert_same_state(model, before)
    assert isinstance(model.base_model.model.visual_projection, ProjectionEditLayer)
