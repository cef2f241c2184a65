"""``method="logit"`` as a forget adapter: the core guarantee survives the PEFT glue (no other class's logit moves),
and the adapter is a full citizen — saved, loaded, verified, merged and unmerged exactly, stacked, carded — or
refused with a clear error where it cannot do what it says."""

import warnings

import pytest
import torch

from hf_clip_forget import ForgetPeftModel, add_forget_adapter, calibrate_forget_adapter
from hf_clip_forget.core import class_text_embeddings, image_side_embeddings
from hf_clip_forget.testing_utils import random_pixels, tiny_clip


CLASSES = ["dog", "cat", "bird", "ship"]
DOMAIN_EDIT = {"retain_classes": CLASSES[1:], "domains": ["sketch"], "retain_domains": ["photo"], "method": "logit"}
# float32 embeddings of a 16-d tiny model: a logit is a 16-term dot product of O(1) entries, rounding ~1e-6
LOGIT_TOLERANCE = 1e-5


def build(tokenizer, model=None, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny random model's estimate may call the edit weak: not the point here
        return add_forget_adapter(model or tiny_clip(), ["dog"], tokenizer, show_progress=False,
                                  **{**DOMAIN_EDIT, **options})  # fmt: skip


def image_embeddings(model, pixels):
    with torch.no_grad():
        return image_side_embeddings(model, pixel_values=pixels)


def classifier(model, tokenizer, templates):
    return class_text_embeddings(model, tokenizer, CLASSES, templates, show_progress=False).embeddings


def test_only_the_forgotten_class_logit_moves_for_any_image(tokenizer):
    edited = build(tokenizer)
    config = edited.peft_config["default"]
    pixels = random_pixels(batch_size=16)
    after = image_embeddings(edited, pixels)
    with edited.disable_adapter():
        before = image_embeddings(edited, pixels)
        text = classifier(edited, tokenizer, config.templates)
    change = (after - before) @ text.T.to(after.dtype)  # unnormalised logits: what the edit guarantees
    assert change[:, 1:].abs().max() < LOGIT_TOLERANCE * before.norm(dim=-1).max()
    assert change[:, 0].abs().max() > 1e-3  # while dog's does move
    assert config.method == "logit" and config.rank_pattern == {"visual_projection": 1}


def test_it_saves_loads_verifies_and_merges_exactly(tokenizer, tmp_path):
    edited = build(tokenizer)
    pixels = random_pixels(batch_size=4)
    expected = image_embeddings(edited, pixels)
    edited.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "*logit*" in card and "μ 10, margin 0.2" in card  # the card says which method and strengths
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    assert torch.allclose(image_embeddings(loaded, pixels), expected, atol=1e-6)
    assert loaded.verify(tokenizer=tokenizer).ok  # rebuilding from the config gives the stored factors
    layer = loaded.base_model.model.visual_projection
    original = layer.get_base_layer().weight.detach().clone()
    loaded.merge_adapter()
    assert torch.allclose(image_embeddings(loaded, pixels), expected, atol=1e-5)
    loaded.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, original)  # exactly revertible


def test_a_logit_adapter_stacks_with_a_nullspace_one(tokenizer):
    model = tiny_clip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stacked = add_forget_adapter(model, ["ship"], tokenizer, retain_classes=CLASSES[:3], show_progress=False)
    stacked = build(tokenizer, model=model, adapter_name="no_sketch_dogs")
    pixels = random_pixels(batch_size=8)
    alone = {}
    for name in ("default", "no_sketch_dogs"):
        stacked.base_model.set_adapter(name)
        alone[name] = image_embeddings(stacked, pixels)
    stacked.base_model.set_adapter(["default", "no_sketch_dogs"])
    both = image_embeddings(stacked, pixels)
    with stacked.disable_adapter():
        plain = image_embeddings(stacked, pixels)
    edit = stacked.base_model.model.visual_projection.combined_edit(["default", "no_sketch_dogs"])
    assert edit.rank == 2  # the nullspace direction and the logit term, composed (docs: P · M_ccup · M_logit)
    assert torch.allclose(both, edit.apply(plain.to(edit.left.dtype)).float(), atol=1e-5)
    assert all(not torch.allclose(both, one, atol=1e-4) for one in alone.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retain_classes": None}, "must know them: pass `retain_classes`"),
        ({"target": "text", "domains": None, "retain_domains": None}, "image side only"),
        ({"prototypes": 2}, "prompts only"),
        ({"keep_shared_direction": True}, "no shared direction"),
        ({"ccup_mu": 3.0}, "strength of ccup edits"),
        ({"logit_margin": -0.1}, "logit_margin"),
    ],
)
def test_what_it_cannot_do_is_refused_before_anything_changes(tokenizer, options, message):
    model = tiny_clip()
    weight = model.visual_projection.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        build(tokenizer, model=model, **options)
    assert torch.equal(model.visual_projection.weight, weight) and not hasattr(model, "peft_config")


def test_calibration_refuses_it_with_the_way_out(tokenizer):
    from hf_clip_forget.evaluation import ImageFeatures

    features = ImageFeatures(torch.randn(8, 16), torch.arange(8) % 4, tuple(CLASSES))
    with pytest.raises(ValueError, match="not calibrated yet"):
        calibrate_forget_adapter(tiny_clip(), ["dog"], tokenizer, data=features, retain_classes=CLASSES[1:],
                                 method="logit", show_progress=False)  # fmt: skip


@pytest.mark.parametrize("loader", ["peft", "transformers"])
def test_plain_peft_and_transformers_load_it_as_saved(tokenizer, tmp_path, loader):
    from peft import PeftModel

    edited = build(tokenizer)
    pixels = random_pixels(batch_size=4)
    expected = image_embeddings(edited, pixels)
    edited.save_pretrained(tmp_path)
    if loader == "peft":
        loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    else:
        loaded = tiny_clip()
        loaded.load_adapter(str(tmp_path))
    assert loaded.peft_config["default"].method == "logit"
    assert torch.equal(image_embeddings(loaded, pixels), expected)


def test_a_logit_config_whose_detectors_do_not_match_its_duals_is_refused(tokenizer, tmp_path):
    import json

    build(tokenizer).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["retain_rank_pattern"] = {"visual_projection": 2}
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="one detector per dual vector"):
        ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_the_default_method_follows_the_request(tokenizer):
    from hf_clip_forget.api.adding import forget_config

    model = tiny_clip()
    domain = {"domains": ["sketch"], "retain_domains": ["photo"]}
    assert forget_config(model, ["dog"], retain_classes=CLASSES[1:], **domain).method == "logit"  # measured best
    assert forget_config(model, ["dog"], **domain).method == "ccup"  # logit needs the other candidates
    assert forget_config(model, ["dog"], retain_classes=CLASSES[1:], prototypes=2, **domain).method == "ccup"
    # a domain edit given CCUP's strength stays the CCUP edit it was before "logit" became the default
    assert forget_config(model, ["dog"], retain_classes=CLASSES[1:], ccup_mu=30.0, **domain).method == "ccup"
    assert forget_config(model, ["dog"], retain_classes=CLASSES[1:]).method == "nullspace"  # global
    with pytest.raises(ValueError, match="`logit_margin` is a strength of logit edits"):
        forget_config(model, ["dog"], retain_classes=CLASSES[1:], logit_margin=0.1)  # global: nullspace ignores it
