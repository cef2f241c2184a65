"""Open-vocabulary detection (OWL-ViT, OWLv2): after forgetting a class, its text query scores every box exactly as
an empty query does, boxes are unchanged, and the edit merges, unmerges (bit for bit), saves and loads."""

import pytest
import torch

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.testing_utils import tiny_model, tiny_pixel_inputs

from .conftest import state_snapshot


DETECTORS = ["OwlViTForObjectDetection", "Owlv2ForObjectDetection"]
# OWL reads a query at its largest token id: with the tiny tokenizer, class names must sort after the template words
QUERIES = ["a photo of a truck.", "a photo of a rocket."]
IMAGES = 2


def detect(model, class_name, tokenizer):
    """Logits ``(images, boxes, queries)``, boxes and box embeddings for every query on every image."""
    inputs = tokenizer(QUERIES * IMAGES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            **tiny_pixel_inputs(class_name, batch_size=IMAGES),
        )  # fmt: skip


def empty_query_logits(model, output) -> torch.Tensor:
    """What a query with no direction at all (an all-zero query embedding) scores on every box."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    features = output.image_embeds.reshape(IMAGES, -1, output.image_embeds.shape[-1])
    with torch.no_grad():
        logits, _ = base.class_predictor(features, torch.zeros(IMAGES, 1, output.text_embeds.shape[-1]), None)
    return logits[..., 0]


def forget_truck(model, tokenizer):
    # the query prompt itself is forgotten: templates=["a photo of a {}."]
    return model.add_forget_adapter(["truck"], tokenizer=tokenizer, templates="single", show_progress=False)


@pytest.mark.parametrize("class_name", DETECTORS)
def test_a_forgotten_query_scores_every_box_as_an_empty_query_and_boxes_do_not_move(class_name, tokenizer):
    base = tiny_model(class_name)
    before = detect(base, class_name, tokenizer)
    assert (before.logits[..., 0] - empty_query_logits(base, before)).abs().max() > 1e-2
    model = forget_truck(base, tokenizer)
    after = detect(model, class_name, tokenizer)
    torch.testing.assert_close(after.logits[..., 0], empty_query_logits(model, after), atol=1e-5, rtol=0)
    assert torch.equal(after.pred_boxes, before.pred_boxes)
    assert (after.logits[..., 1] - before.logits[..., 1]).abs().max() > 1e-3  # other queries do see the edit


@pytest.mark.parametrize("class_name", DETECTORS)
def test_detection_edits_merge_unmerge_bit_for_bit_and_reload(class_name, tokenizer, tmp_path):
    base = tiny_model(class_name)
    snapshot = state_snapshot(base)
    model = forget_truck(base, tokenizer)
    unmerged = detect(model, class_name, tokenizer).logits
    model.merge_adapter()
    torch.testing.assert_close(detect(model, class_name, tokenizer).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    state = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    assert all(torch.equal(state[name], value) for name, value in snapshot.items())
    model.save_pretrained(tmp_path)
    reloaded = ForgetPeftModel.from_pretrained(tiny_model(class_name), tmp_path)
    assert torch.equal(detect(reloaded, class_name, tokenizer).logits, unmerged)
