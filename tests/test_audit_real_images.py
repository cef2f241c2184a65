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


def test_forgetting_only_the_name_dog_on_the_text_side_leaks_through_puppy_and_the_audit_says_so(pacs):
    """A text-side edit of "dog" removes the name's directions from the text embeddings; "puppy" keeps most of what
    pointed at dogs, so dog proxies are still recognised as puppies."""
    report = audit(pacs, "text")
    puppy = next(row for row in report.rows if row.probe == "neighbour name" and row.subject == "puppy")
    assert puppy.before > 0.9 and puppy.verdict == "leaks"
    assert puppy in report.leaks
    images = next(row for row in report.rows if row.probe == "zero-shot with neighbours")
    assert images.verdict != "gone" and images.after > images.chance  # dog images still found under dog-or-puppy


def test_the_image_side_edit_closes_that_leak_and_the_tower_features_are_reported_untouched(pacs):
    report = audit(pacs, "visual")
    puppy = next(row for row in report.rows if row.probe == "neighbour name" and row.subject == "puppy")
    assert puppy.verdict == "gone"
    _, _, features = pacs
    tower = next(row for row in report.rows if row.subject.startswith("tower features"))
    dogs = features.labels == features.class_names.index("dog")
    assert tower.before == tower.after == pytest.approx(linear_probe(features.features, dogs).balanced_accuracy)
    assert tower.verdict == "unchanged (expected)" and tower.before > 0.6  # the towers still know dogs
