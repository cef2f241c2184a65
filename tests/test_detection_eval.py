"""Box counts per query before/after forgetting (`evaluate_detection`) on tiny OWL-ViT / OWLv2 detectors and real
photos: the forgotten query scores every box as an empty query, so at a threshold above that floor the detector's
own post-processing returns no box labelled with it, while it did before at the same threshold.

The data is read from `../shared/data` (or `$HF_CLIP_FORGET_DATA`).
"""

import json

import pytest
import torch
from transformers import Owlv2ImageProcessorPil, Owlv2Processor, OwlViTImageProcessorPil, OwlViTProcessor

from hf_clip_forget.evaluation import DETECTOR_CLASSES, DetectionReport, evaluate_detection
from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer

from .real_data import PACS_TEST, needs_pacs


DETECTORS = ["OwlViTForObjectDetection", "Owlv2ForObjectDetection"]
# OWL reads a query at its largest token id: with the tiny tokenizer, class names must sort after the template words
QUERIES = ["a photo of a truck.", "a photo of a rocket."]
FORGOTTEN, OTHER = QUERIES
# the floor is a maximum over boxes: a forgotten query at the floor (to ~1e-7) stays below floor + MARGIN
MARGIN = 1e-4

pytestmark = needs_pacs


def tiny_detector(class_name: str):
    """A tiny random detector whose scores spread over (0, 1) as a trained one's do.

    At the default initialisation the class head's shift and scale put logits at ±80, where every sigmoid score is 0
    or 1 and no threshold separates anything; shrinking those two heads keeps per-box floors close together and
    lets the query's cosine decide, as in a trained detector.
    """
    model = tiny_model(class_name)
    with torch.no_grad():
        model.class_head.logit_shift.weight.mul_(0.01)
        model.class_head.logit_scale.weight.mul_(0.1)
    return model


def tiny_detector_processor(class_name: str):
    """The detector's processor for 32×32 images, with the tiny tokenizer."""
    if class_name == "Owlv2ForObjectDetection":  # OWLv2 pads to a square, then resizes
        return Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tiny_tokenizer())
    image_processor = OwlViTImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    return OwlViTProcessor(image_processor, tiny_tokenizer())


def pacs_photos(count: int = 4) -> list:
    """The first ``count`` photo-domain images of PACS test."""
    from hf_clip_forget.evaluation import load_labelled_images

    dataset = load_labelled_images(PACS_TEST, split="test")
    photo = dataset.features["domain"].names.index("photo")
    indices = [i for i, domain in enumerate(dataset["domain"]) if domain == photo][:count]
    return [dataset[i]["image"].convert("RGB") for i in indices]


@pytest.fixture(scope="module")
def photos():
    return pacs_photos()


def forget_truck(model):
    # the query prompt itself is forgotten: templates=["a photo of a {}."]
    return model.add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), templates="single", show_progress=False)


def raw_detection(model, processor, images):
    """Logits ``(images, boxes, queries)`` and the empty query's logits ``(images, boxes)``, computed directly."""
    inputs = processor(text=[QUERIES] * len(images), images=images, return_tensors="pt")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        output = model(**inputs)
        features = output.image_embeds.reshape(len(images), -1, output.image_embeds.shape[-1])
        empty, _ = base.class_predictor(features, torch.zeros(len(images), 1, output.text_embeds.shape[-1]), None)
    return output.logits, empty[..., 0]


def expected_counts(logits: torch.Tensor, threshold: float) -> list[list[int]]:
    """Boxes labelled with each query: best query per box, kept when its score exceeds the threshold."""
    scores, labels = torch.sigmoid(logits).max(dim=-1)
    return [
        [int(((labels[i] == q) & (scores[i] > threshold)).sum()) for q in range(len(QUERIES))]
        for i in range(len(logits))
    ]


@pytest.mark.parametrize("class_name", DETECTORS)
def test_a_forgotten_query_keeps_no_box_above_the_empty_query_floor(class_name, photos):
    processor = tiny_detector_processor(class_name)
    base = tiny_detector(class_name)
    logits_before, empty = raw_detection(base, processor, photos)
    threshold = torch.sigmoid(empty).max().item() + MARGIN  # from the measured floor
    model = forget_truck(base)
    logits_after, _ = raw_detection(model, processor, photos)

    report = evaluate_detection(model, processor, photos, QUERIES, threshold=threshold)

    assert report.total_boxes(FORGOTTEN, "before") > 0  # it labelled boxes at this threshold before
    assert report.total_boxes(FORGOTTEN, "after") == 0
    assert report.scores_as_empty_query(FORGOTTEN) and not report.scores_as_empty_query(OTHER)
    assert report.gap_to_empty_after[0] <= 1e-5 < 1e-2 < report.gap_to_empty_before[0]
    # the reported floor is the one measured directly, and the forgotten query's best score sits on it
    torch.testing.assert_close(torch.tensor(report.empty_query_score), torch.sigmoid(empty).amax(dim=1))
    assert abs(report.max_score_after[0] - max(report.empty_query_score)) <= 1e-5
    assert report.empty_query_boxes == (0,) * len(photos)
    # every count is the post-processing's own: as computed from the raw logits, before and after
    assert [list(row) for row in report.boxes_before] == expected_counts(logits_before, threshold)
    assert [list(row) for row in report.boxes_after] == expected_counts(logits_after, threshold)
    assert report.total_boxes(OTHER, "after") == sum(row[1] for row in expected_counts(logits_after, threshold))


@pytest.mark.parametrize("class_name", DETECTORS)
def test_below_the_floor_the_report_says_a_forgotten_query_can_still_label_boxes(class_name, photos):
    processor = tiny_detector_processor(class_name)
    model = forget_truck(tiny_detector(class_name))
    logits, _ = raw_detection(model, processor, photos)
    report = evaluate_detection(model, processor, photos, QUERIES, threshold=0.0)
    boxes = logits.shape[1]
    assert report.empty_query_boxes == (boxes,) * len(photos)  # every floor score is > 0
    assert sum(map(sum, report.boxes_after)) == boxes * len(photos)  # so every box is kept, labelled with its best
    # where the other query scores below the floor, the forgotten query (at the floor) is the best: still returned
    assert report.total_boxes(FORGOTTEN, "after") > 0 and report.scores_as_empty_query(FORGOTTEN)
    assert "raise the threshold above" in str(report)


@pytest.mark.parametrize("class_name", DETECTORS)
def test_a_reference_model_gives_the_before_column_of_a_merged_detector(class_name, photos):
    processor = tiny_detector_processor(class_name)
    edited = forget_truck(tiny_detector(class_name))
    with_adapter = evaluate_detection(edited, processor, photos, QUERIES, threshold=0.5)
    merged = edited.merge_and_unload()
    with_reference = evaluate_detection(
        merged, processor, photos, QUERIES, threshold=0.5, reference=tiny_detector(class_name)
    )
    assert with_reference.boxes_before == with_adapter.boxes_before
    assert with_reference.boxes_after == with_adapter.boxes_after


def test_a_merged_adapter_gives_the_same_counts_and_stays_merged_bit_for_bit(photos):
    processor = tiny_detector_processor(DETECTORS[0])
    model = forget_truck(tiny_detector(DETECTORS[0]))
    unmerged = evaluate_detection(model, processor, photos, QUERIES, threshold=0.5)
    model.merge_adapter()
    layer = model.get_base_model().class_head.dense0
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    merged = evaluate_detection(model, processor, photos, QUERIES, threshold=0.5)
    assert (merged.boxes_before, merged.boxes_after) == (unmerged.boxes_before, unmerged.boxes_after)
    assert layer.merged_adapters == ["default"]  # disabling for the 'before' column unmerged it: merged again
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)


def test_the_report_is_immutable_json_and_readable(photos):
    processor = tiny_detector_processor(DETECTORS[0])
    model = forget_truck(tiny_detector(DETECTORS[0]))
    names = [f"photo_{i}.jpg" for i in range(len(photos))]
    report = evaluate_detection(model, processor, photos, QUERIES, threshold=0.5, image_names=names, batch_size=3)
    assert isinstance(report, DetectionReport)
    with pytest.raises(AttributeError):
        report.threshold = 0.9
    result = json.loads(json.dumps(report.to_dict()))
    assert result["threshold"] == 0.5 and [row["image"] for row in result["per_image"]] == names
    assert result["per_query"][FORGOTTEN]["boxes_before"] == report.total_boxes(FORGOTTEN, "before")
    assert result["per_query"][FORGOTTEN]["scores_as_empty_query_after"] is True
    assert result["per_image"][1]["boxes_after"][OTHER] == report.boxes_after[1][1]
    text = str(report)
    assert "score > 0.5" in text and FORGOTTEN in text and OTHER in text and "empty query" in text
    # batches of 3 and of 8 images give the same counts
    assert evaluate_detection(model, processor, photos, QUERIES, threshold=0.5).boxes_after == report.boxes_after


def test_what_it_cannot_evaluate_is_refused(photos):
    processor = tiny_detector_processor(DETECTORS[0])
    with pytest.raises(ValueError, match="no adapter to disable"):
        evaluate_detection(tiny_detector(DETECTORS[0]), processor, photos, QUERIES)
    with pytest.raises(ValueError, match=", ".join(DETECTOR_CLASSES)):
        evaluate_detection(tiny_model("CLIPModel"), processor, photos, QUERIES)
    model = forget_truck(tiny_detector(DETECTORS[0]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        evaluate_detection(model, processor, photos, QUERIES, threshold=1.5)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_detection(model, processor, photos, [FORGOTTEN, FORGOTTEN])
    with pytest.raises(ValueError, match="post_process_grounded_object_detection"):
        evaluate_detection(model, processor.image_processor, photos, QUERIES)
