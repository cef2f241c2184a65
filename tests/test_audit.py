"""The audit's mechanics on a tiny CLIP: rows and verdicts follow from the numbers, before is the unedited model and
after the edited one, the report round-trips through JSON and plots, and bad requests are refused."""

import json

import pytest
import torch

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.audit import AuditReport, AuditRow, audit_forgetting, verdict, vocabulary_words
from hf_clip_forget.core import DOMAIN_TEMPLATES, HELD_OUT_TEMPLATES, PHOTO_TEMPLATES, TEMPLATE_SETS, linear_probe
from hf_clip_forget.evaluation import ImageFeatures
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer


CLASSES = ["cat", "dog", "car", "ship"]
NEIGHBOURS = ["puppy", "hound"]


@pytest.fixture(scope="module")
def audit_tokenizer():
    words = {w for t in HELD_OUT_TEMPLATES for w in t.replace("{}", " ").replace(".", " ").replace("'", " ").split()}
    return tiny_tokenizer(extra_words=words | set(NEIGHBOURS))


@pytest.fixture
def edited(audit_tokenizer):
    model = tiny_clip(seed=1)
    return add_forget_adapter(model, ["dog"], audit_tokenizer, retain_classes=["cat", "car", "ship"],
                              show_progress=False)  # fmt: skip


def random_features(model, per_class: int = 12, seed: int = 0) -> ImageFeatures:
    """Cached image features (inputs of the tiny CLIP's visual projection) of a labelled random image set."""
    generator = torch.Generator().manual_seed(seed)
    width = model.get_base_model().visual_projection.in_features if hasattr(model, "get_base_model") else 32
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    return ImageFeatures(torch.randn(len(labels), width, generator=generator), labels, tuple(CLASSES))


def test_held_out_templates_are_disjoint_from_every_built_in_set():
    built_in = set(PHOTO_TEMPLATES).union(*TEMPLATE_SETS.values(), *DOMAIN_TEMPLATES.values()) - set(
        HELD_OUT_TEMPLATES
    )
    assert not set(HELD_OUT_TEMPLATES) & built_in
    assert len(set(HELD_OUT_TEMPLATES)) == len(HELD_OUT_TEMPLATES) >= 16


@pytest.mark.parametrize(
    ("before", "after", "chance", "expected"),
    [(1.0, 0.1, 0.1, "gone"), (1.0, 0.3, 0.1, "reduced"), (1.0, 0.6, 0.1, "leaks"), (0.1, 0.1, 0.1, "gone")],
)
def test_verdicts_compare_what_is_left_above_chance_with_what_was_there(before, after, chance, expected):
    assert verdict(before, after, chance) == expected


def test_a_rank_counts_as_gone_when_it_reaches_the_middle():
    assert verdict(1.2, 4.0, 4.0, higher_is_recognised=False, tolerance=0.15) == "gone"
    assert verdict(1.2, 1.5, 4.0, higher_is_recognised=False, tolerance=0.15) == "leaks"


def test_data_free_audit_reports_before_and_after_from_the_unedited_and_the_edited_model(edited, audit_tokenizer):
    report = audit_forgetting(edited, audit_tokenizer, neighbours=NEIGHBOURS, vocabulary_neighbours=2,
                              show_progress=False)  # fmt: skip
    assert report.forgotten_classes == ("dog",) and report.data is None
    assert report.candidate_classes == ("dog", "cat", "car", "ship")
    assert set(report.probes_run) == {"held-out prompts", "neighbour name", "logit margin"}
    neighbour_rows = [row for row in report.rows if row.probe == "neighbour name"]
    assert [row.subject for row in neighbour_rows][:2] == NEIGHBOURS and len(neighbour_rows) == 4
    margin = next(row for row in report.rows if row.probe == "logit margin")
    # the nullspace edit removes the class's own embedding directions: its held-out proxies lose their margin
    assert margin.after < margin.before
    held_out = next(row for row in report.rows if row.probe == "held-out prompts")
    assert held_out.chance == pytest.approx(1 / 4)
    assert set(held_out.details) == set(HELD_OUT_TEMPLATES)


def test_before_is_the_unedited_model_and_after_the_edited_one(audit_tokenizer):
    """With alpha = 0 the edit is the identity: every row's after equals its before, which the real edit changes."""
    rows = {}
    for alpha in (0.0, 1.0):
        model = add_forget_adapter(tiny_clip(seed=1), ["dog"], audit_tokenizer, retain_classes=["cat", "car", "ship"],
                                   alpha=alpha, show_progress=False)  # fmt: skip
        report = audit_forgetting(model, audit_tokenizer, neighbours=NEIGHBOURS, vocabulary_neighbours=0,
                                  data=random_features(model), show_progress=False)  # fmt: skip
        rows[alpha] = [row for row in report.rows if row.verdict != "skipped"]
    assert all(row.before == pytest.approx(row.after) for row in rows[0.0])
    assert [row.before for row in rows[0.0]] == pytest.approx([row.before for row in rows[1.0]])
    assert any(row.after != pytest.approx(row.before) for row in rows[1.0])


def test_the_report_round_trips_through_json_prints_a_table_and_plots(edited, audit_tokenizer, tmp_path):
    report = audit_forgetting(edited, audit_tokenizer, neighbours=NEIGHBOURS, vocabulary_neighbours=0,
                              data=random_features(edited), show_progress=False)  # fmt: skip
    report.save(tmp_path / "audit.json")
    assert AuditReport.load(tmp_path / "audit.json") == report
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["verdicts"] == report.counts() and data["probes_run"] == list(report.probes_run)
    text = str(report)
    assert "| probe | class |" in text and "linear probe" in text and "dog" in text
    report.plot(tmp_path / "audit.png")
    assert (tmp_path / "audit.png").read_bytes()[:4] == b"\x89PNG"


def test_image_probes_run_with_data_and_the_tower_feature_probe_is_the_untouched_reference(edited, audit_tokenizer):
    features = random_features(edited)
    report = audit_forgetting(edited, audit_tokenizer, vocabulary_neighbours=0, data=features, show_progress=False)
    probes = set(report.probes_run)
    assert {"zero-shot with neighbours", "zero-shot, held-out prompts", "image→text rank"} <= probes
    assert {"text→image R-precision", "linear probe"} <= probes
    tower = next(row for row in report.rows if row.subject.startswith("tower features"))
    reference = linear_probe(features.features, features.labels == CLASSES.index("dog")).balanced_accuracy
    assert tower.before == tower.after == pytest.approx(reference)
    assert tower.verdict == "unchanged (expected)"


def test_a_forgotten_class_without_images_gets_a_skipped_row_that_says_why(edited, audit_tokenizer):
    features = random_features(edited)
    keep = features.labels != CLASSES.index("dog")
    without_dog = ImageFeatures(features.features[keep], features.labels[keep], features.class_names)
    report = audit_forgetting(edited, audit_tokenizer, vocabulary_neighbours=0, data=without_dog,
                              show_progress=False)  # fmt: skip
    skipped = [row for row in report.rows if row.verdict == "skipped" and row.probe == "image probes"]
    assert len(skipped) == 1 and "0 image(s) of 'dog'" in skipped[0].note
    assert "image→text rank" not in report.probes_run


def test_bad_requests_are_refused_before_any_work(edited, audit_tokenizer):
    with pytest.raises(ValueError, match="classes of the edit themselves"):
        audit_forgetting(edited, audit_tokenizer, neighbours=["cat"], vocabulary_neighbours=0, show_progress=False)
    with pytest.raises(ValueError, match="vocabulary. is empty"):
        audit_forgetting(edited, audit_tokenizer, vocabulary=[], show_progress=False)
    with pytest.raises(ValueError, match="holds no forget adapter"):
        audit_forgetting(tiny_clip(), audit_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="do not forget"):
        audit_forgetting(edited, audit_tokenizer, neighbours={"cat": ["kitty"]}, show_progress=False)


def test_vocabulary_words_are_whole_words_only():
    words = vocabulary_words(tiny_tokenizer(extra_words=["puppy"]), limit=1000)
    assert "puppy" in words and all(word.isalpha() and word.islower() and len(word) >= 3 for word in words)
    assert not [w for w in words if w.startswith(("[", "<", "#"))]


def test_a_skipped_row_has_no_numbers():
    row = AuditRow.skipped("image probes", "dog", "", "no data")
    assert row.before is None and row.after is None and row.verdict == "skipped"
    with pytest.raises(ValueError, match="verdict"):
        AuditRow("p", "dog", "", "", 1.0, 0.0, 0.5, "maybe")


def test_the_audit_uses_the_prompt_cache_unless_told_not_to(edited, audit_tokenizer):
    import os

    from hf_clip_forget.core import prompt_cache

    def entries() -> list[str]:
        folder = prompt_cache.prompt_cache_dir()
        return [n for n in os.listdir(folder) if n.endswith(".safetensors")] if os.path.isdir(folder) else []

    built = entries()  # building the adapter cached its own prompts
    uncached = audit_forgetting(edited, audit_tokenizer, vocabulary_neighbours=0, show_progress=False,
                                use_cache=False)  # fmt: skip
    assert entries() == built
    prompt_cache.clear_prompt_cache()
    cached = audit_forgetting(edited, audit_tokenizer, vocabulary_neighbours=0, show_progress=False)
    assert entries()

    def numbers(report) -> list[float]:
        return [value for row in report.rows for value in (row.before, row.after) if value is not None]

    assert numbers(cached) == pytest.approx(numbers(uncached), abs=1e-5)
