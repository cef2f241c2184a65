"""The comparison script's rows on a tiny model: the columns the issue asks for, and the revert column is measured."""

import importlib.util
import os

import pytest
import torch

from hf_clip_forget.evaluation import ImageFeatures, class_embeddings
from hf_clip_forget.testing_utils import tiny_clip


CLASSES = ("cat", "dog", "bird", "ship")
COLUMNS = {"forget_accuracy", "retain_accuracy", "edit_seconds", "artifact_bytes", "reverts_exactly"}


@pytest.fixture(scope="module")
def script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "compare_baselines.py")
    spec = importlib.util.spec_from_file_location("compare_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def task(tokenizer):
    model = tiny_clip()
    generator = torch.Generator().manual_seed(0)
    features = ImageFeatures(
        features=torch.randn(40, 32, generator=generator), labels=torch.arange(40) % 4, class_names=CLASSES
    )
    with torch.no_grad():
        text = class_embeddings(model, tokenizer, list(CLASSES), show_progress=False)
    return model, features, text


def test_our_rows_revert_exactly_and_leave_the_model_unwrapped(script, task, tokenizer):
    model, features, text = task
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        row = script.run_ours("nullspace", model, tokenizer, None, features, text, "cat")
    assert COLUMNS <= set(row) and row["reverts_exactly"] is True and row["artifact_bytes"] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("cached", [False, True])
def test_the_lora_baseline_trains_a_copy_and_reports_its_revert(script, task, tokenizer, cached):
    model, features, text = task
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.enable_grad():
        row = script.run_lora(model, tokenizer, features, "cat", steps=5, cached=cached)
    assert COLUMNS <= set(row) and isinstance(row["reverts_exactly"], bool) and row["edit_seconds"] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the baseline edits a copy
