"""The audit on real images (the demo model on a stratified PACS sample): a leak built on purpose is reported, and the
linear probe on the tower features is reported as untouched by the edit."""

import pytest
import torch

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.audit import audit_forgetting
from hf_clip_forget.core import linear_probe
from hf_clip_forget.evaluation import embed_images
from hf_clip_forget.models.demo import load_demo_model

from .real_data import needs_pacs, stratified_pacs


PER_CELL = 4  # images per (domain, class): 112 images

pytestmark = needs_pacs


@pytest.fixture(scope="module")
def pacs():
    model, processor = load_demo_model()
    with torch.no_grad():
        features = embed_images(model, stratified_pacs(PER_CELL), processor.image_processor, show_progress=False)
    return model, processor.tokenizer, features


def audit(pacs, target, **options):
    model, tokenizer, features = pacs
    others = [name for name in features.class_names if name != "dog"]
    edited = add_forget_adapter(model, ["dog"], tokenizer, target=target, show_progress=False, **options)
    try:
        return audit_forgetting(edited, tokenizer, neighbours=["puppy", "hound"], vocabulary_neighbours=0,
                                candidate_classes=others, data=features, show_progress=False)  # fmt: skip
    finally:
        edited.unload()  # the module-scoped model goes back to its original weights


def test_a_text_side_edit_leaves_dogs_findable_in_the_image_embeddings_and_the_audit_says_so(pacs):
    """A text-side edit of "dog" changes only text embeddings: the image embeddings are exactly what they were, so a
    linear probe on them still finds the dogs. That is a leak by construction, and the audit must report it as one."""
    report = audit(pacs, "text")
    probe = next(row for row in report.rows if row.subject == "image embeddings")
    assert probe.before == probe.after and probe.before > 0.6  # the embeddings were not touched, and do know dogs
    assert probe.verdict == "leaks" and probe in report.leaks
    held_out = next(row for row in report.rows if row.probe == "zero-shot, held-out prompts")
    assert held_out.after < held_out.before  # while zero-shot recognition of dogs did fall


def test_the_image_side_edit_closes_that_leak_and_the_tower_features_are_reported_untouched(pacs):
    report = audit(pacs, "visual")
    puppy = next(row for row in report.rows if row.probe == "neighbour name" and row.subject == "puppy")
    assert puppy.verdict == "gone"
    _, _, features = pacs
    tower = next(row for row in report.rows if row.subject.startswith("tower features"))
    dogs = features.labels == features.class_names.index("dog")
    assert tower.before == tower.after == pytest.approx(linear_probe(features.features, dogs).balanced_accuracy)
    assert tower.verdict == "unchanged (expected)" and tower.before > 0.6  # the towers still know dogs
