"""Effectiveness on real images: the demo model on a stratified sample of PACS test (all four domains).

The tiny random models of the other tests show mechanics; whether forgetting *works* can only be seen on real
images. The full measurement (every split, more forget sets) is `scripts/measure_forgetting.py` → docs/forgetting.md;
this keeps its central claims under test. The data is read from `../shared/data` (or `$HF_CLIP_FORGET_DATA`).
"""

import pytest
import torch

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.evaluation import (
    project_image_features,
    score_predictions,
    zero_shot_logits,
)

from .real_data import demo_model_on_pacs, needs_pacs


PER_CELL = 6  # images per (domain, class): 168 images, ~15 s of feature extraction on a 2-core CPU

pytestmark = needs_pacs

FORGET_GOAL = 0.05  # the seed papers' bar for a forgotten class: at most 5 % of its images still recognised


@pytest.fixture(scope="module")
def pacs():
    """``(model, tokenizer, features, class text embeddings)`` of the demo model on the PACS sample."""
    return demo_model_on_pacs(PER_CELL)


def accuracies(model, features, text, forget):
    with torch.no_grad():
        logits = zero_shot_logits(project_image_features(model, features), text)
    return score_predictions(logits.argmax(dim=-1), features, forget)


def forget_by_name(pacs, forget, **options):
    model, tokenizer, features, text = pacs
    before = accuracies(model, features, text, forget)
    edited = add_forget_adapter(model, forget, tokenizer, show_progress=False, **options)
    try:
        after = accuracies(edited, features, text, forget)
    finally:
        edited.unload()  # the module-scoped model goes back to its original weights
    return before, after


def test_the_demo_model_recognises_pacs_in_every_domain(pacs):
    model, _, features, text = pacs
    report = accuracies(model, features, text, [])
    assert report.accuracy >= 0.7
    for domain in features.domain_names:
        cells = [v for k, v in report.per_domain_class.items() if k.startswith(f"{domain}/")]
        assert sum(cells) / len(cells) >= 0.6, domain


@pytest.mark.parametrize("method", ["nullspace", "ccup"])
@pytest.mark.parametrize("forget", [["person"], ["house"], ["guitar", "person", "giraffe"]])
def test_naming_the_other_classes_forgets_in_every_domain_and_keeps_the_rest(pacs, method, forget):
    others = [name for name in pacs[2].class_names if name not in forget]
    before, after = forget_by_name(pacs, forget, method=method, retain_classes=others)
    assert before.forget_accuracy >= 0.8  # there was something to forget
    assert after.forget_accuracy <= FORGET_GOAL
    for domain in pacs[2].domain_names:  # forgotten in every domain: at most one image per forgotten cell on average
        cells = [after.per_domain_class[f"{domain}/{name}"] for name in forget]
        assert sum(cells) / len(cells) <= 1 / PER_CELL, domain
    assert after.retain_accuracy >= before.retain_accuracy - 0.02


def test_keeping_the_shared_direction_is_what_removes_the_residue(pacs):
    """Plain nullspace (no retain classes) leaves photo "person"s recognised; keeping the shared direction does not."""
    _, plain = forget_by_name(pacs, ["person"])
    others = [name for name in pacs[2].class_names if name != "person"]
    _, shared = forget_by_name(pacs, ["person"], retain_classes=others)
    assert plain.forget_accuracy >= 0.05 and shared.forget_accuracy <= 0.02
    assert plain.per_domain_class["photo/person"] > shared.per_domain_class["photo/person"]
