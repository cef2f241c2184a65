"""Calibration's mechanics on a tiny CLIP: the search finds a known optimum, the adapter written is the one measured,
the config and card record the calibration (and survive save/load), and bad requests are refused before the model
is touched."""

import dataclasses
import json
import math

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from hf_clip_forget import ForgetPeftModel, add_forget_adapter, calibrate_forget_adapter
from hf_clip_forget.calibration import CalibrationReport, CalibrationSearch, read_validation_data
from hf_clip_forget.core import class_text_embeddings, normalize_rows
from hf_clip_forget.core.calibration import (
    CalibrationBudget,
    Candidate,
    check_calibration_record,
    choose_candidate,
    drop_difference_se,
)
from hf_clip_forget.evaluation import ImageFeatures, evaluate_zero_shot, image_representation
from hf_clip_forget.testing_utils import tiny_clip, tiny_image_processor
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import assert_same_state, state_snapshot


SINGLE = ["a photo of a {}."]
#: The constructed problem: a "cat" image is still recognised while α < its threshold, a "dog" image while α < its.
FORGET_THRESHOLDS = (0.12, 0.22, 0.32, 0.42, 0.57, 0.72)
KEPT_THRESHOLDS = (0.63, 0.82, 0.87, 0.97)
#: forget ≤ 1/6 needs α ≥ 0.57; a drop ≤ 0.1 (less than one dog image in four) needs α < 0.63.
BUDGET = {"max_forget": 0.2, "max_retain_drop": 0.1}


def constructed_features(model, tokenizer) -> ImageFeatures:
    """Inputs of the tiny CLIP's visual projection whose image embeddings make the zero-shot decision between "cat"
    and "dog" flip at known strengths α of a nullspace edit of "cat" (rank 1, no shared direction kept).

    With ``e1`` the cat text direction and ``e2`` the dog direction's part orthogonal to it (``t_dog = b1 e1 + b2
    e2``), an image ``y = x1 e1 + x2 e2`` becomes ``(1 − α) x1 e1 + x2 e2``; cat beats dog iff
    ``(1 − b1)(1 − α) x1 > b2 x2``. A cat image (``x2 = 1``) is recognised iff ``α < α*`` for
    ``x1 = b2 / ((1 − b1)(1 − α*))``; a dog image (``x1 < 0``, ``x2 = −1``) iff ``α < β*``.
    """
    text = class_text_embeddings(model, tokenizer, ["cat", "dog"], SINGLE, show_progress=False).embeddings
    e1 = text[0]
    b1 = float(text[1] @ e1)
    e2 = normalize_rows(text[1] - b1 * e1)[0]
    b2 = float(text[1] @ e2)
    rows = [(b2 / ((1 - b1) * (1 - a)), 1.0) for a in FORGET_THRESHOLDS]
    rows += [(-b2 / ((1 - b1) * (1 - b)), -1.0) for b in KEPT_THRESHOLDS]
    embeddings = torch.stack([x1 * e1 + x2 * e2 for x1, x2 in rows])
    weight = model.visual_projection.weight.detach().double()  # (16, 32), full row rank: W W⁺ = I
    inputs = (embeddings @ torch.linalg.pinv(weight).T).float()
    labels = torch.tensor([0] * len(FORGET_THRESHOLDS) + [1] * len(KEPT_THRESHOLDS))
    return ImageFeatures(inputs, labels, ("cat", "dog"), representation=image_representation(model))


def expected(alpha: float) -> tuple[float, float]:
    """(forget accuracy, retain drop) of the constructed problem at ``alpha``, from the thresholds alone."""
    forget = sum(alpha < a for a in FORGET_THRESHOLDS) / len(FORGET_THRESHOLDS)
    return forget, sum(alpha >= b for b in KEPT_THRESHOLDS) / len(KEPT_THRESHOLDS)


def calibrate_constructed(tokenizer, **options):
    model = tiny_clip()
    data = constructed_features(model, tokenizer)
    # the geometry is that of the one-template classifier: judge with it
    options = {"budget": BUDGET, "templates": "single", "eval_templates": "single", "keep_shared_direction": False,
               **options}  # fmt: skip
    return calibrate_forget_adapter(model, ["cat"], tokenizer, data=data, show_progress=False, **options), data


def has_forget_layers(model) -> bool:
    return any(isinstance(module, ProjectionEditLayer) for module in model.modules())


# ----------------------------------------------------------------------------------------------- the search
def test_on_the_grid_the_only_strength_meeting_the_budget_is_chosen(tokenizer):
    (model, report), _ = calibrate_constructed(tokenizer, search={"refine": 0})
    assert [c.strength["alpha"] for c in report.candidates] == [round(0.05 * i, 2) for i in range(1, 21)]
    for candidate in report.candidates:  # every measured number is the one the geometry predicts
        assert (candidate.forget_accuracy, candidate.retain_drop) == pytest.approx(
            expected(candidate.strength["alpha"])
        )
    assert [c.strength["alpha"] for c in report.candidates if c.meets(report.budget)] == [0.6]
    assert report.chosen.strength == {"alpha": 0.6} and report.budget_met
    assert model.peft_config["default"].alpha == 0.6


def test_refinement_closes_in_on_the_boundary_and_keeps_the_middle_of_the_strengths_it_cannot_tell_apart(tokenizer):
    (_, report), _ = calibrate_constructed(tokenizer)  # default: 3 rounds of refinement
    alphas = [c.strength["alpha"] for c in report.candidates]
    assert {0.575, 0.5625, 0.56875, 0.625, 0.6375, 0.63125} <= set(alphas)  # midpoints where a bound switches
    for candidate in report.candidates:
        assert (candidate.forget_accuracy, candidate.retain_drop) == pytest.approx(
            expected(candidate.strength["alpha"])
        )
    # the feasible set is [0.57, 0.63): every tried point in it drops nothing and forgets alike, so the validation
    # set cannot tell them apart: the middle of the tried ones (0.575 … 0.625) is kept, furthest from both bounds
    assert report.chosen.strength == {"alpha": 0.6} and report.choice == "met"
    assert report.forget_accuracy.before == 1.0 and report.forget_accuracy.after == pytest.approx(1 / 6)
    assert report.kept_accuracy.before == report.kept_accuracy.after == 1.0


def test_when_no_strength_meets_the_budget_the_report_says_so_and_keeps_the_best_trade_off(tokenizer):
    # forget ≤ 0 needs α ≥ 0.72, no drop at all needs α < 0.63: impossible together
    (model, report), _ = calibrate_constructed(tokenizer, budget={"max_forget": 0.0, "max_retain_drop": 0.0})
    assert not report.budget_met and report.choice == "retain_only"
    assert 0.57 <= report.chosen.strength["alpha"] < 0.63  # the most forgetting that drops nothing
    assert "BUDGET NOT MET" in str(report) and report.to_dict()["budget_met"] is False
    assert model.peft_config["default"].calibration["budget_met"] is False


@pytest.mark.parametrize(
    ("candidates", "rule", "chosen"),
    [
        # met: least retain drop (exactly, without per-image records), then the middle of the tied range, weaker
        ([(0.3, 0.0, 0.02), (0.5, 0.0, 0.0), (0.7, 0.0, 0.0), (0.9, 0.0, 0.005)], "met", 0.5),
        ([(0.5, 0.0, 0.0), (0.7, 0.0, 0.0), (0.9, 0.0, 0.0)], "met", 0.7),
        # met: the lowest forget accuracy among the least drops, then the middle of those
        ([(0.5, 0.01, 0.0), (0.6, 0.0, 0.0), (0.8, 0.0, 0.0), (1.0, 0.0, 0.0)], "met", 0.8),
        # none met, some within the drop budget: the lowest forget accuracy among those
        ([(0.3, 0.5, 0.0), (0.5, 0.2, 0.01), (0.7, 0.1, 0.05)], "retain_only", 0.5),
        # nothing within the drop budget: the smallest total excess
        ([(0.3, 0.5, 0.05), (0.5, 0.2, 0.04), (0.7, 0.0, 0.30)], "nearest", 0.5),
    ],
)
def test_the_choice_rules(candidates, rule, chosen):
    budget = CalibrationBudget(max_forget=0.0, max_retain_drop=0.01)
    built = [Candidate({"alpha": a}, f, 0.9 - d, d) for a, f, d in candidates]
    picked, how = choose_candidate(built, budget)
    assert how == rule and picked.strength["alpha"] == chosen


def _correct(flips: int, images: int = 400) -> torch.Tensor:
    """Per-image correctness on the kept images after an edit that misclassifies the first ``flips`` of them."""
    return torch.arange(images) >= flips


def test_drops_the_validation_set_cannot_tell_apart_tie_and_the_lowest_forget_accuracy_wins():
    """A drop one kept image larger is within 1.96 paired standard errors of the difference (≈ 1/400 on 400
    images): the stronger strength, which forgets more, is chosen. Eight images larger is significant: the least drop
    wins."""
    budget = CalibrationBudget(max_forget=0.02, max_retain_drop=0.05)
    weak = Candidate({"alpha": 0.8}, 0.02, 0.9, 0.0, "kept", _correct(0))
    one_more = Candidate({"alpha": 0.9}, 0.0, 0.9 - 1 / 400, 1 / 400, "kept", _correct(1))
    eight_more = Candidate({"alpha": 1.0}, 0.0, 0.9 - 8 / 400, 8 / 400, "kept", _correct(8))
    assert drop_difference_se(one_more, weak) == pytest.approx(math.sqrt(1 / 400 - 1 / 400**2) / 20)
    assert choose_candidate([weak, one_more], budget) == (one_more, "met")
    assert choose_candidate([weak, eight_more], budget) == (weak, "met")
    # without per-image records (or measured on different groups) drops compare exactly: the least drop wins
    assert choose_candidate([weak, dataclasses.replace(one_more, drop_correct=None)], budget)[0] is weak
    other_group = dataclasses.replace(one_more, drop_group="kept classes")
    assert drop_difference_se(other_group, weak) == 0.0


def test_a_domain_calibration_bounds_the_class_in_the_kept_domains_on_its_own():
    """Pooled, the few images of the forgotten class in the kept domains hide among the kept classes' many: each kept
    group's drop is bounded, and a candidate's retain drop is the larger."""
    from hf_clip_forget.calibration.data import SAME_CLASS_KEPT, check_request, kept_groups

    data = read_validation_data(labelled_images(num_images=24))
    request = check_request(["cat"], None, ["sketch"], ["photo"], None, data)
    bounded = kept_groups(request, data)
    cat, photo = data.labels == data.class_names.index("cat"), data.domains == data.domain_names.index("photo")
    assert torch.equal(bounded[SAME_CLASS_KEPT], cat & photo) and torch.equal(bounded["kept classes"], ~cat)
    assert list(kept_groups(dataclasses.replace(request, paradigm="complete"), data)) == ["kept"]


# ----------------------------------------------------------------------------- the adapter written is the one measured
def random_features(model, per_class=10, seed=0) -> ImageFeatures:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    inputs = torch.randn(len(labels), model.visual_projection.in_features, generator=generator)
    return ImageFeatures(inputs, labels, ("cat", "dog", "bird", "ship"), representation=image_representation(model))


@pytest.mark.parametrize(("method", "target"), [("nullspace", "visual"), ("nullspace", "text"), ("ccup", "visual")])
def test_the_chosen_numbers_are_those_of_the_adapter_written_and_of_its_saved_copy(
    tokenizer, tmp_path, method, target
):
    model = tiny_clip()
    features = random_features(model)
    budget = {"max_forget": 0.1, "max_retain_drop": 0.05}
    edited, report = calibrate_forget_adapter(model, ["cat"], tokenizer, data=features, budget=budget, method=method,
                                              target=target, templates="single", show_progress=False)  # fmt: skip
    chosen = report.chosen
    assert (
        report.forget_accuracy.after == chosen.forget_accuracy and report.kept_accuracy.after == chosen.kept_accuracy
    )
    # an independent measurement (the evaluation harness, with its default classifier — the one `eval` uses, whatever
    # templates the edit was built from) of the model returned, and of the adapter once saved
    assert report.classifier == "imagenet (80 templates)"
    measured = evaluate_zero_shot(edited, features, ["cat"], tokenizer=tokenizer, show_progress=False)
    assert (measured.forget_accuracy, measured.retain_accuracy) == (chosen.forget_accuracy, chosen.kept_accuracy)
    edited.save_pretrained(tmp_path / "adapter")
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    again = evaluate_zero_shot(loaded, features, ["cat"], tokenizer=tokenizer, show_progress=False)
    assert (again.forget_accuracy, again.retain_accuracy) == (chosen.forget_accuracy, chosen.kept_accuracy)
    config = loaded.peft_config["default"]
    assert {k: getattr(config, k) for k in chosen.strength} == chosen.strength and config.target_modules == {
        "visual_projection" if target == "visual" else "text_projection"
    }
    assert loaded.verify(tokenizer=tokenizer).ok  # the factors are those of the named classes


# ----------------------------------------------------------------------------------- the record: config and card
def test_config_and_card_record_the_calibration_and_survive_save_and_load(tokenizer, tmp_path):
    (model, report), data = calibrate_constructed(tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["calibration"]
    assert saved == report.to_dict() and CalibrationReport.from_dict(saved) == report
    assert saved["budget"] == BUDGET and saved["chosen"] == {"alpha": 0.6} and saved["searched"] == ["alpha"]
    assert saved["validation"]["num_images"] == len(data) and saved["validation"]["forget_images"] == 6
    assert saved["validation"]["sha256"] == read_validation_data(data).sha256
    assert saved["classifier"] == '"a photo of a {}."'  # the classifier that judged, as asked (eval_templates)
    assert {row["name"]: row["after"] for row in saved["per_class"]} == {"cat": pytest.approx(1 / 6), "dog": 1.0}
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    assert loaded.peft_config["default"].calibration == saved
    # a data-free effect estimate recorded for the first strength tried does not stay with another strength
    estimate = loaded.peft_config["default"].provenance.get("effect_estimate")
    assert estimate is None or estimate["strength"] == saved["chosen"]
    card = ModelCard.load(tmp_path / "adapter" / "README.md").text
    section = card.split("## Calibration")[1].split("## Audit")[0]
    for text in ("data-assisted in its strength, data-free in its directions", "budget met", "α = 0.6",
                 saved["validation"]["sha256"], "10 labelled images (6 to forget, 4 to keep)", "| cat | forget | 6 |",
                 "(zero-shot classification with"):  # fmt: skip
        assert text in section, text
    report.save(tmp_path / "report.json")
    assert CalibrationReport.load(tmp_path / "report.json") == report
    report.plot(tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_an_uncalibrated_adapter_says_its_strength_was_given(tokenizer, tmp_path):
    add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["calibration"] == {}
    assert "The strength of the edit was given, not calibrated" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda record: record["chosen"].update(alpha=0.33), "not among the `candidates`"),
        (lambda record: record["validation"].update(sha256="not a hash"), "64 lower-case hex digits"),
        (lambda record: record["budget"].update(max_forget=2.0), "fractions in [0, 1]"),
        (lambda record: record.pop("per_cell"), "must have exactly the fields"),
    ],
)
def test_an_altered_calibration_record_is_refused_on_load(tokenizer, tmp_path, tamper, message):
    (model, _), _ = calibrate_constructed(tokenizer, search={"refine": 0})
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    tamper(config["calibration"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="calibration") as error:
        ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert message in str(error.value)


def test_a_record_whose_chosen_strength_is_not_the_configs_is_refused(tokenizer):
    (model, _), _ = calibrate_constructed(tokenizer, search={"refine": 0})
    config = model.peft_config["default"]
    with pytest.raises(ValueError, match="this config's strength is"):
        dataclasses.replace(config, alpha=0.3)
    check_calibration_record({})  # not calibrated: nothing to check


# ------------------------------------------------------------------------------------------------ bad requests
def labelled_images(num_images=16, classes=("cat", "dog", "bird"), domains=("photo", "sketch"), seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(num_images)]
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    columns = {"image": images, "label": [i % len(classes) for i in range(num_images)]}
    if domains:
        features["domain"] = datasets.ClassLabel(names=list(domains))
        columns["domain"] = [(i // len(classes)) % len(domains) for i in range(num_images)]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"budget": {"max_forget": -0.01}}, "must be in [0, 1]"),
        ({"budget": {"max_retain_drop": 2}}, "must be in [0, 1]"),
        ({"budget": {"max_drop": 0.1}}, "Unknown budget entries"),
        ({"classes": ["cta"]}, "did you mean 'cat'"),
        ({"classes": ["ship"]}, "does not have: 'ship'"),
        ({"classes": ["cat"], "data": labelled_images().select([i for i in range(16) if i % 3])}, "no images of the forgotten class 'cat'"),
        ({"classes": ["cat"], "data": labelled_images(classes=("cat",))}, "no class besides the forgotten ones"),
        ({"classes": ["cat"], "retain_classes": ["bird"], "data": labelled_images().select([0, 1, 3, 4])}, "no images of any retain class"),
        ({"domains": ["skecth"], "retain_domains": ["photo"]}, "did you mean 'sketch'"),
        ({"domains": ["sketch"], "retain_domains": ["photo"], "data": labelled_images(domains=None)}, "no domain column"),
        ({"domains": ["sketch"], "retain_domains": ["photo"], "data": labelled_images(num_images=3)}, "forgotten cell sketch/cat"),
        ({"domains": ["sketch"]}, "pass `retain_domains`"),
        ({"alpha": 0.5}, "α is what the calibration chooses"),
        ({"search": {"alphas": [0, 0.5]}}, "numbers in (0, 1]"),
        ({"adapter_name": "a.b"}, "adapter_name"),
        ({"target": "text", "domains": ["sketch"], "retain_domains": ["photo"]}, "target='visual'"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_before_the_model_is_touched(tokenizer, request_, message):
    model = tiny_clip()
    snapshot = state_snapshot(model)
    options = {"classes": ["cat"], "data": labelled_images(), **request_}
    classes = options.pop("classes")
    with pytest.raises((ValueError, TypeError)) as error:
        calibrate_forget_adapter(model, classes, tokenizer, image_processor=tiny_image_processor(), show_progress=False,
                                 **options)  # fmt: skip
    assert message in str(error.value)
    assert not has_forget_layers(model)
    assert_same_state(model, snapshot)


# ------------------------------------------------------------------------------------ datasets, stacking, failure
def test_a_dataset_is_embedded_once_and_identified_by_its_images_and_labels(tokenizer):
    data = labelled_images(num_images=24)
    same, relabelled = (
        labelled_images(num_images=24),
        labelled_images(num_images=24).map(
            lambda row, i: {"label": (row["label"] + (i == 0)) % 3}, with_indices=True, features=data.features
        ),
    )
    assert read_validation_data(data).sha256 == read_validation_data(same).sha256
    assert read_validation_data(data).sha256 != read_validation_data(relabelled).sha256
    edited, report = calibrate_forget_adapter(tiny_clip(), ["cat"], tokenizer, data=data, domains=["sketch"],
                                              retain_domains=["photo"], image_processor=tiny_image_processor(),
                                              templates="single", show_progress=False)  # fmt: skip
    assert report.paradigm == "domain" and report.method == "ccup" and report.searched == ("ccup_lambda", "ccup_mu")
    cells = {row.name: row.group for row in report.per_cell}
    assert cells["sketch/cat"] == "forget" and cells["photo/cat"] == "kept" and cells["sketch/dog"] == "kept"
    assert report.validation.forget_images == 4 and report.validation.kept_images == 20
    assert report.validation.hashed == "image bytes, labels and domains"

    def drop(rows) -> float:  # a group's drop, from its cells
        return sum(r.images * (r.before - r.after) for r in rows) / sum(r.images for r in rows)

    kept_cells = [row for row in report.per_cell if row.group == "kept"]
    same_class = [row for row in kept_cells if row.name.endswith("/cat")]
    others = [row for row in kept_cells if not row.name.endswith("/cat")]
    assert report.retain_drop == pytest.approx(max(drop(same_class), drop(others)))


def test_calibrating_a_model_with_an_adapter_stacks_and_measures_before_with_it(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["dog"], tokenizer, templates="single", show_progress=False)
    features = random_features(model.get_base_model())
    dogs_before = evaluate_zero_shot(model, features, ["dog"], tokenizer=tokenizer, show_progress=False)
    edited, report = calibrate_forget_adapter(model, ["cat"], tokenizer, data=features, templates="single",
                                              budget={"max_forget": 0.2, "max_retain_drop": 0.2}, show_progress=False)  # fmt: skip
    assert edited is model and sorted(edited.active_adapters) == ["default", "forget_1"]
    assert report.adapter == "forget_1"
    per_class = {row.name: row.before for row in report.per_class}
    assert per_class["dog"] == dogs_before.per_class["dog"]  # "before" is the model with its existing adapter


def test_a_failure_during_the_search_takes_the_new_adapter_back(tokenizer, monkeypatch):
    from hf_clip_forget.calibration import run

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(run, "search_strengths", broken)
    model = tiny_clip()
    snapshot = state_snapshot(model)
    with pytest.raises(RuntimeError, match="interrupted"):
        calibrate_forget_adapter(model, ["cat"], tokenizer, data=random_features(model), show_progress=False)
    assert not has_forget_layers(model)
    assert_same_state(model, snapshot)
    stacked = add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        calibrate_forget_adapter(stacked, ["cat"], tokenizer, data=random_features(stacked.get_base_model()),
                                 show_progress=False)  # fmt: skip
    assert list(stacked.peft_config) == ["default"] and stacked.active_adapters == ["default"]


def test_the_search_grid_is_validated_and_accepts_a_dict():
    assert CalibrationSearch.of({"alphas": [0.5, 0.25, 0.5], "refine": 0}).alphas == (0.25, 0.5)
    with pytest.raises(ValueError, match="refine"):
        CalibrationSearch(refine=-1)
    with pytest.raises(ValueError, match="mus"):
        CalibrationSearch(mus=[1e9])
