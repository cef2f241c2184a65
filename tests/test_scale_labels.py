"""Evaluation, calibration and command-line paths over label sets of 1,000–20,000 classes (issue 24): they look class
names up instead of scanning the class list per name, and give what the per-name scans gave. Correctness only; the
timing is measured by scripts, never asserted here."""

import datasets
import pytest
import torch

from hf_clip_forget.calibration.data import CalibrationRequest, ValidationData, check_request, groups
from hf_clip_forget.cli.arguments import refuse_classes_not_in_data
from hf_clip_forget.cli.loading import CommandError
from hf_clip_forget.evaluation import (
    ImageFeatures,
    class_embeddings,
    evaluate_zero_shot,
    project_image_features,
    zero_shot_logits,
)
from hf_clip_forget.evaluation.detection import DetectionReport
from hf_clip_forget.evaluation.reports import forgotten_class_cells, score_predictions
from hf_clip_forget.testing_utils import TINY_CLASS_NAMES, tiny_clip


NAMES = tuple(f"class {i}" for i in range(20_000))


def features_of(model, labels, class_names, seed=0) -> ImageFeatures:
    """Random pre-projection features of ``len(labels)`` images of ``model``'s vision tower, labelled ``labels``."""
    width = model.visual_projection.in_features
    generator = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.randn(len(labels), width, generator=generator), torch.tensor(labels), class_names)


def test_zero_shot_over_1000_classes_sharing_prompt_names_scores_each_class_with_its_prompt(tokenizer):
    model = tiny_clip()
    classes = tuple(f"class {i}" for i in range(1_000))
    prompt_of = {name: TINY_CLASS_NAMES[i % len(TINY_CLASS_NAMES)] for i, name in enumerate(classes)}
    labels = torch.randint(0, 1_000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    features = features_of(model, labels, classes)
    forget = [classes[label] for label in dict.fromkeys(labels[:40])]
    report = evaluate_zero_shot(
        model, features, forget, tokenizer=tokenizer, templates="single", class_prompts=prompt_of,
        show_progress=False,
    )  # fmt: skip
    unique = list(dict.fromkeys(prompt_of.values()))  # the reference: each class's row by scanning the prompt names
    text = class_embeddings(model, tokenizer, unique, "single", show_progress=False)
    rows = torch.stack([text[unique.index(prompt_of[name])] for name in classes])
    predictions = zero_shot_logits(project_image_features(model, features), rows).argmax(dim=-1)
    assert report == score_predictions(predictions, features, forget)
    assert report.forget_classes == tuple(forget) and report.num_images == 300


def test_forget_classes_among_20000_are_checked_by_name():
    model = tiny_clip()
    features = features_of(model, [0, 5, 19_999], NAMES)
    with pytest.raises(ValueError, match=r"Forget classes \['nope'\] are not classes of the dataset"):
        evaluate_zero_shot(model, features, ["class 5", "nope"], show_progress=False)
    with pytest.raises(ValueError, match=r"no images of the forget classes \['class 7'\]"):
        evaluate_zero_shot(model, features, ["class 19999", "class 7"], show_progress=False)


def test_forget_accuracy_over_20000_classes_counts_the_named_classes():
    labels = torch.tensor([19_999, 19_999, 3, 3, 12_345, 0])
    predictions = torch.tensor([19_999, 1, 3, 3, 12_345, 7])
    features = ImageFeatures(torch.zeros(6, 2), labels, NAMES)
    report = score_predictions(predictions, features, ["class 19999", "class 0"])
    assert report.forget_accuracy == pytest.approx(1 / 3)  # images of classes 19999, 19999, 0: one right
    assert report.retain_accuracy == 1.0 and report.accuracy == pytest.approx(4 / 6)
    assert report.per_class == {"class 0": 0.0, "class 3": 1.0, "class 12345": 1.0, "class 19999": 0.5}


def test_forgotten_class_cells_of_1000_classes_in_3_domains_match_the_per_cell_scan():
    domains, classes = ("photo", "sketch", "cartoon"), [f"class {i}" for i in range(1_000)]
    cells = [f"{domain}/{name}" for domain in domains for name in classes]
    before = {cell: (i % 97) / 97 for i, cell in enumerate(cells)}
    after = {cell: (i % 89) / 89 for i, cell in enumerate(cells)}
    images = {cell: i % 5 for i, cell in enumerate(cells)}
    forget = classes[::3]
    rows = forgotten_class_cells(before, after, forget, ["sketch"], images)
    # the reference, by scanning the lists per cell and per class as the function once did
    kept = [n for n in before if n.split("/", 1)[1] in forget and n.split("/", 1)[0] != "sketch"]
    pooled = {}
    for name in forget:
        own = [n for n in kept if n.split("/", 1)[1] == name and images.get(n)]
        total = sum(images[n] for n in own)
        if len(own) > 1 and total:
            pooled[name] = [sum(images[n] * side[n] for n in own) / total for side in (before, after)]
    assert [row.name for row in rows if row.role == "forgotten cell"] == [f"sketch/{name}" for name in forget]
    assert [row.name for row in rows if row.role == "kept domain"] == kept
    assert {row.name: [row.before, row.after] for row in rows if row.role == "pooled"} == {
        f"{name} in the kept domains": value for name, value in pooled.items()
    }


def test_calibration_groups_over_20000_classes_pick_the_named_classes_images():
    labels = torch.tensor([19_999, 5, 5, 12_000, 0])
    data = ValidationData(NAMES, labels, None, None, "sha", "test")
    request = check_request(["class 5", "class 19999"], ["class 0", "class 12000"], [], [], None, data)
    forget, kept = groups(request, data)
    assert forget.tolist() == [True, True, True, False, False] and kept.tolist() == [False, False, False, True, True]
    default = check_request(["class 5"], None, [], [], None, ValidationData(NAMES[:1_000], labels % 1_000, None,
                                                                              None, "sha", "test"))  # fmt: skip
    assert isinstance(default, CalibrationRequest) and len(default.retain_classes) == 999
    assert "class 5" not in default.retain_classes
    with pytest.raises(ValueError, match="'class 20000'"):
        check_request(["class 20000"], None, [], [], None, data)


def test_the_command_line_names_the_classes_missing_from_20000_labels():
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(NAMES))})
    dataset = datasets.Dataset.from_dict({"image": [None, None], "label": [0, 19_999]}, features=features)
    refuse_classes_not_in_data(dataset, ["class 19999", "class 0"], "--classes")
    with pytest.raises(CommandError, match=r"'klass 7'.*'nope'"):
        refuse_classes_not_in_data(dataset, ["class 3", "klass 7", "nope"], "--classes")


def test_a_detection_report_of_1000_queries_counts_each_query_in_its_column():
    queries = tuple(f"query {i}" for i in range(1_000))
    boxes_before = tuple(tuple((image + q) % 3 for q in range(1_000)) for image in range(4))
    boxes_after = tuple(tuple((image * q) % 2 for q in range(1_000)) for image in range(4))
    gaps = tuple(0.0 if q % 10 == 0 else 1.0 for q in range(1_000))
    report = DetectionReport(
        queries, tuple(f"image {i}" for i in range(4)), 0.1, boxes_before, boxes_after, (0.5,) * 1_000,
        (0.5,) * 1_000, (1.0,) * 1_000, gaps, (0.1,) * 4, (0,) * 4,
    )  # fmt: skip
    for q in (0, 1, 537, 999):
        assert report.total_boxes(queries[q], "before") == sum((image + q) % 3 for image in range(4))
        assert report.total_boxes(queries[q]) == sum((image * q) % 2 for image in range(4))
        assert report.scores_as_empty_query(queries[q]) == (q % 10 == 0)
    per_query = report.to_dict()["per_query"]
    assert list(per_query) == list(queries)
    assert per_query["query 537"]["boxes_after"] == report.total_boxes("query 537")
    assert [per_query[q]["scores_as_empty_query_after"] for q in queries[:11]] == [True, *[False] * 9, True]
    with pytest.raises(ValueError, match="'query 1000' is not one of the report's queries"):
        report.total_boxes("query 1000")
