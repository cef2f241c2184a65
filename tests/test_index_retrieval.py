"""Retrieval from a stored index (``hf_clip_forget.index.retrieval``): R-precision and its chance level on hand-made
examples, the image→image probe, the query-only edit's identity and its caveat, the audit's wiring on a tiny model,
and on real PACS images that the recommended edit makes an index forget a class."""

import json
import warnings

import pytest
import torch
from torch.nn.functional import normalize

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.core import encode_prompts
from hf_clip_forget.evaluation import project_image_features
from hf_clip_forget.index import embedding_edit
from hf_clip_forget.index.retrieval import (
    INDEX_RECOMMENDED_OPTIONS,
    QUERY_ONLY_CAVEAT,
    QueryOnlyWarning,
    audit_index,
    chance_precision,
    chance_spread,
    edit_query,
    image_query_precision,
    index_recommendation,
    r_precision,
    text_query_precision,
)
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

from .real_data import demo_model_on_pacs, needs_pacs


# ------------------------------------------------------------------------------------------------ the metrics
def test_r_precision_counts_the_relevant_items_among_the_top_r():
    relevant = torch.tensor([True, False, True, False, False])  # R = 2
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0],  # top 2: items 0, 1 → 1 of 2
                           [0.1, 0.2, 0.9, 0.3, 0.8],  # top 2: items 2, 4 → 1 of 2
                           [0.9, 0.0, 0.8, 0.1, 0.2],  # top 2: items 0, 2 → 2 of 2
                           [0.0, 0.9, 0.1, 0.8, 0.7]])  # fmt: skip  # top 2: items 1, 3 → 0 of 2
    assert r_precision(scores, relevant).tolist() == [0.5, 0.5, 1.0, 0.0]
    assert r_precision(scores[2], relevant).ndim == 0 and float(r_precision(scores[2], relevant)) == 1.0
    per_query = torch.tensor([[True, True, False, False, False]]).expand(4, 5)  # a relevance mask per query
    assert r_precision(scores, per_query).tolist() == [1.0, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="at least one relevant"):
        r_precision(scores, torch.zeros(5, dtype=torch.bool))


def test_ties_count_at_their_expected_value_so_a_constant_score_is_chance():
    relevant = torch.tensor([True] * 3 + [False] * 9)
    assert float(r_precision(torch.zeros(12), relevant)) == pytest.approx(chance_precision(3, 12))
    # R = 3: one relevant item strictly on top, then 2 slots shared by a tie of 6 items of which 2 are relevant
    scores = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    relevant = torch.tensor([True, True, False, True, False, False, False])
    assert float(r_precision(scores, relevant)) == pytest.approx((1 + 2 * 2 / 6) / 3)


def test_chance_level_and_spread_are_those_of_random_rankings():
    total, count = 140, 20
    relevant = torch.zeros(total, dtype=torch.bool)
    relevant[:count] = True
    generator = torch.Generator().manual_seed(0)
    precision = r_precision(torch.rand(4000, total, generator=generator), relevant)
    spread = chance_spread(count, total)
    assert chance_precision(count, total) == pytest.approx(1 / 7)
    assert float(precision.mean()) == pytest.approx(1 / 7, abs=4 * spread / 4000**0.5)
    assert float(precision.std()) == pytest.approx(spread, rel=0.1)
    assert chance_spread(1000, 7000) == pytest.approx(0.0100, abs=5e-4)


def test_image_query_precision_leaves_the_query_out():
    stored = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    relevant = torch.tensor([True, True, False, False])
    assert image_query_precision(stored, relevant).tolist() == [1.0, 1.0]  # each finds the other, not itself
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # the class's two vectors point apart
    assert image_query_precision(apart, relevant).tolist() == [0.0, 0.0]
    assert image_query_precision(torch.randn(50, 4), torch.arange(50) < 30, max_queries=7).numel() == 7
    with pytest.raises(ValueError, match="at least 2"):
        image_query_precision(stored, torch.tensor([True, False, False, False]))


def test_text_query_precision_ranks_by_cosine_not_dot_product():
    stored = torch.tensor([[10.0, 1.0], [0.1, 0.1], [0.0, 5.0]])  # the first is long, the second points like the query
    query = torch.tensor([[1.0, 1.0]])
    assert text_query_precision(query, stored, torch.tensor([False, True, False])).tolist() == [1.0]


# ---------------------------------------------------------------------------------------- tiny-model mechanics
@pytest.fixture(scope="module")
def tiny():
    tokenizer, base = tiny_tokenizer(), tiny_clip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weak-edit estimates of a tiny random model are beside the point here
        model = add_forget_adapter(base, ["truck"], tokenizer, retain_classes=["ship", "tree"], method="ccup",
                                   templates="single", show_progress=False)  # fmt: skip
    return model, tokenizer


def test_the_query_edit_scores_raw_vectors_as_the_edited_index_does(tiny):
    model, _ = tiny
    generator = torch.Generator().manual_seed(1)
    queries, stored = torch.randn(5, 16, generator=generator), torch.randn(9, 16, generator=generator) * 3
    edit = embedding_edit(model, "image")
    assert not torch.allclose(edit.matrix(), edit.matrix().T)  # CCUP: not symmetric, so Mᵀ is not M
    exact = queries.double() @ edit.apply(stored.double(), normalized=False).T
    with pytest.warns(QueryOnlyWarning, match="Only the query is edited"):  # offered only with its caveat
        edited_queries = edit_query(model, queries.double())
    assert torch.allclose(edited_queries @ stored.double().T, exact, atol=1e-10)
    # a cosine index stores e/‖e‖: the query-only score is q·Me/‖e‖, the edited index's q·Me/‖Me‖
    cosine_index = edited_queries @ normalize(stored.double(), dim=-1).T
    ratio = stored.double().norm(dim=-1) / edit.apply(stored.double(), normalized=False).norm(dim=-1)
    edited_index = queries.double() @ normalize(edit.apply(stored.double(), normalized=False), dim=-1).T
    assert torch.allclose(cosine_index * ratio, edited_index, atol=1e-10)
    assert (ratio - 1).abs().max() > 0.01  # the factor is not constant: rankings can differ


def test_audit_index_scores_the_edited_index_with_the_edited_models_queries(tiny):
    model, tokenizer = tiny
    with model.base_model.edits_bypassed():
        query = normalize(encode_prompts(model.get_base_model(), tokenizer, ["a photo of a truck."],
                                         show_progress=False, use_cache=False), dim=-1)  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    others = normalize(torch.randn(30, 16, generator=generator), dim=-1)
    trucks = query + 0.01 * torch.randn(
        10, 16, generator=generator
    )  # stored "images" of trucks: the query's direction
    stored, labels = torch.cat([trucks, others]), torch.tensor([0] * 10 + [1] * 15 + [2] * 15)
    report = audit_index(model, tokenizer, stored, labels, ["truck", "ship", "tree"], neighbours=["car"],
                         vocabulary_neighbours=0, query_only=True)  # fmt: skip
    rows = {(row.probe, row.subject): row for row in report.rows}
    own = rows[("text→image R-precision", "adapter prompts (1)")]
    assert own.before == 1.0 and own.chance == chance_precision(10, 40)  # by construction
    edited = normalize(embedding_edit(model, "image").matrix().float() @ stored.T, dim=0).T
    assert own.after == pytest.approx(float(r_precision(query @ edited.T, labels == 0)))
    assert ("text→image R-precision", "neighbour: car") in rows
    assert any(p == "text→image R-precision" and s.startswith("held-out prompts") for p, s in rows)
    image = rows[("image→image precision@R", "stored vectors of the class as queries (10)")]
    assert image.before == 1.0 and image.chance == chance_precision(9, 39)
    assert ("text→image R-precision, query edited only", "adapter prompts (1)") in rows
    assert report.stored == 40 and report.forgotten_classes == ("truck",)
    json.dumps(report.to_dict())  # what a provenance file records
    assert "truck" in str(report)
    absent = audit_index(model, tokenizer, stored, labels, ["ship", "tree", "car"], vocabulary_neighbours=0)
    assert [row.verdict for row in absent.rows] == ["skipped"]


# ------------------------------------------------------------------------------------------------ real images
@needs_pacs
def test_the_recommended_edit_makes_a_pacs_index_forget_the_class():
    """140 PACS test images (5 per domain × class), the demo model: "dog" prompts find dogs well above chance in
    the unedited index and no better than chance in the index edited with the recommended settings. The margin is
    3 standard deviations of a random ranking's R-precision on this sample (:func:`chance_spread`)."""
    model, tokenizer, features, _ = demo_model_on_pacs(5)
    names = list(features.class_names)
    stored = project_image_features(model, features)
    edited = add_forget_adapter(model, ["dog"], tokenizer, retain_classes=[n for n in names if n != "dog"],
                                show_progress=False, **INDEX_RECOMMENDED_OPTIONS)  # fmt: skip
    try:
        assert index_recommendation(edited.peft_config["default"]) is None
        report = audit_index(edited, tokenizer, stored, features.labels, names, vocabulary_neighbours=0)
    finally:
        edited.unload()
    count = int((features.labels == names.index("dog")).sum())
    margin = 3 * chance_spread(count, len(stored))
    for row in (r for r in report.rows if r.probe == "text→image R-precision"):
        assert row.before >= row.chance + margin, row
        assert row.after <= row.chance + margin, row


# ------------------------------------------------------------------------------------------------ the recommendation
@pytest.mark.parametrize(
    ("options", "warned"),
    [
        ({}, True),  # a plain nullspace edit
        ({"retain_classes": ["ship", "tree"]}, True),  # the default once retain names are given: shared direction
        ({"retain_classes": ["ship", "tree"], "keep_shared_direction": False}, True),
        ({"retain_classes": ["ship", "tree"], "method": "ccup", "ccup_mu": 10.0}, True),
        ({"retain_classes": ["ship", "tree"], "method": "logit"}, True),  # margin 0.2: no headroom
        ({"retain_classes": ["ship", "tree"], "target": "text"}, True),  # the index is not edited
        ({"retain_classes": ["ship", "tree"], **INDEX_RECOMMENDED_OPTIONS}, False),
        ({"retain_classes": ["ship"], "domains": ["sketch"], "retain_domains": ["photo"]}, False),  # not measured
        ({"retain_classes": ["ship", "tree"], "method": "ccup", "ccup_mu": 1e5}, False),  # not measured
    ],
)
def test_index_recommendation_warns_exactly_for_settings_measured_not_to_forget(options, warned):
    from hf_clip_forget.api.adding import forget_config

    config = forget_config(tiny_clip(), ["truck"], **options)
    warning = index_recommendation(config)
    if warned:
        assert "logit_margin=0.3" in warning and "docs/index_forgetting.md" in warning and warning.count(". ") == 0
    else:
        assert warning is None


def test_the_quoted_numbers_are_those_of_the_committed_measurement():
    """``QUERY_ONLY_CAVEAT`` and the warnings quote ``docs/index_forgetting.json`` (re-run the script, then update)."""
    import re
    from pathlib import Path

    from hf_clip_forget.index.retrieval import _MEASURED_ON_TRAIN

    path = Path(__file__).resolve().parent.parent / "docs" / "index_forgetting.json"
    run = json.loads(path.read_text())
    assert run["decision"]["chosen"] == "logit margin=0.3" and INDEX_RECOMMENDED_OPTIONS["logit_margin"] == 0.3
    chosen = [s for s in run["summary"] if s["variant"] == run["decision"]["chosen"] and s["dataset"] == "pacs"]
    values = {round(s[key], 3) for s in chosen for key in s if isinstance(s[key], float)}
    assert {float(n) for n in re.findall(r"\d\.\d{3}", QUERY_ONLY_CAVEAT)} <= values
    train = [s for s in run["summary"] if s["split"] == "train"]
    measured_as = {"ccup+shared": ("ccup", "ccup μ=1", "ccup μ=10", "ccup μ=1000")}  # the script's variant names
    for setting, (_, gone, total, worst) in _MEASURED_ON_TRAIN.items():
        variants = measured_as.get(setting, (setting,))
        lines = [s for s in train if s["variant"] in variants]
        assert round(max(s["worst_excess"] for s in lines), 3) == worst, setting
        assert (min(sum(s["classes_gone"] for s in lines if s["variant"] == v) for v in variants), total) == (
            gone,
            sum(s["classes"] for s in lines if s["variant"] == variants[0]),
        ), setting
