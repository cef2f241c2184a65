"""Boxes per text query before and after a forget edit of an open-vocabulary detector (OWL-ViT, OWLv2).

::

    from hf_clip_forget.evaluation import evaluate_detection

    edited = detector.add_forget_adapter(["cat"], tokenizer=processor.tokenizer, templates=["a photo of a {}"])
    report = evaluate_detection(edited, processor, images, ["a photo of a cat", "a photo of a dog"], threshold=0.1)
    print(report)            # boxes per query before/after, and the score an empty query gets
    report.to_dict()

Boxes are what the detector's own processor returns (``post_process_grounded_object_detection``: each box is
labelled with its best-scoring query and kept when that score exceeds ``threshold``), so the counts are what a user
of the edited model sees. After forgetting a query's prompt, that query scores every box exactly as an *empty* query
(an all-zero query embedding) does — the box's own ``logit_shift`` times its ``logit_scale`` — so whether its boxes
disappear depends on the threshold against that floor: the report gives the floor's highest score per image and how
many boxes it alone would keep. With no box above the floor, a forgotten query is returned for no box.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..families import FAMILIES, DualEncoderFamily, find_family


#: The detector classes this evaluation runs on (the families declared ``detector=True``).
DETECTOR_CLASSES: tuple[str, ...] = tuple(
    name for family in FAMILIES if family.detector for name in family.model_classes
)
#: A query whose logits are within this of the empty query's on every box scores as an empty query (a forgotten one:
#: the tests measure ≤ 2e-6 on tiny detectors; an unrelated query differs by O(1)).
EMPTY_QUERY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class DetectionReport:
    """Detected boxes per query and image, before and after an edit, at one score threshold.

    Scores are the processor's: the sigmoid of a box's logit for a query. Rows are images, columns queries.

    Attributes:
        queries: the text queries, in the order given.
        images: a name per image (its path, or ``"image <i>"``).
        threshold: a box is kept when its best query's score exceeds this.
        boxes_before, boxes_after: ``[image][query]`` boxes the post-processing labels with that query.
        max_score_before, max_score_after: per query, its highest score on any box of any image.
        gap_to_empty_before, gap_to_empty_after: per query, the largest ``|logit − empty-query logit|`` over every
            box; ≤ :data:`EMPTY_QUERY_TOLERANCE` means the query scores every box as an empty query (forgotten).
        empty_query_score: per image, the highest score an empty query gets on any box: the floor a forgotten
            query falls to. It does not depend on the query (the shift and scale are computed from the box alone)
            nor on the edit (which does not reach them), so it is reported per image, not per query.
        empty_query_boxes: per image, how many boxes an empty query's score alone would keep at ``threshold``: when
            0, a forgotten query is returned for no box of that image.
        before, after: what each column is (``"<model> (adapters disabled)"``, ``"<model> + adapter"``…).
    """

    queries: tuple[str, ...]
    images: tuple[str, ...]
    threshold: float
    boxes_before: tuple[tuple[int, ...], ...]
    boxes_after: tuple[tuple[int, ...], ...]
    max_score_before: tuple[float, ...]
    max_score_after: tuple[float, ...]
    gap_to_empty_before: tuple[float, ...]
    gap_to_empty_after: tuple[float, ...]
    empty_query_score: tuple[float, ...]
    empty_query_boxes: tuple[int, ...]
    before: str = "before"
    after: str = "after"

    def total_boxes(self, query: str, when: str = "after") -> int:
        """Boxes labelled ``query`` over all images, ``when`` ``"before"`` or ``"after"`` the edit."""
        if when not in ("before", "after"):
            raise ValueError(f"`when` must be 'before' or 'after', got {when!r}.")
        if query not in self._columns:
            raise ValueError(f"{query!r} is not one of the report's queries {list(self.queries)}.")
        column = self._columns[query]
        return sum(row[column] for row in (self.boxes_before if when == "before" else self.boxes_after))

    def scores_as_empty_query(self, query: str) -> bool:
        """Whether ``query`` scores every box as an empty query does after the edit (it was forgotten)."""
        return self.gap_to_empty_after[self._columns[query]] <= EMPTY_QUERY_TOLERANCE

    @functools.cached_property
    def _columns(self) -> dict[str, int]:
        """Query → its column (the first, were one given twice): a lookup per query, not a scan of the queries."""
        columns: dict[str, int] = {}
        for column, query in enumerate(self.queries):
            columns.setdefault(query, column)
        return columns

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: settings, a summary per query and the counts per image."""
        per_query = {
            query: {
                "boxes_before": self.total_boxes(query, "before"),
                "boxes_after": self.total_boxes(query, "after"),
                "max_score_before": self.max_score_before[column],
                "max_score_after": self.max_score_after[column],
                "gap_to_empty_query_before": self.gap_to_empty_before[column],
                "gap_to_empty_query_after": self.gap_to_empty_after[column],
                "scores_as_empty_query_after": self.scores_as_empty_query(query),
            }
            for column, query in enumerate(self.queries)
        }
        per_image = [
            {
                "image": name,
                "empty_query_score": self.empty_query_score[row],
                "empty_query_boxes": self.empty_query_boxes[row],
                "boxes_before": dict(zip(self.queries, self.boxes_before[row], strict=True)),
                "boxes_after": dict(zip(self.queries, self.boxes_after[row], strict=True)),
            }
            for row, name in enumerate(self.images)
        ]
        return {
            "threshold": self.threshold,
            "models": {"before": self.before, "after": self.after},
            "empty_query_score": max(self.empty_query_score),
            "per_query": per_query,
            "per_image": per_image,
        }

    def __str__(self) -> str:
        width = max(24, *(len(query) for query in self.queries)) + 1
        lines = [
            f"boxes per query on {len(self.images)} images, kept when score > {self.threshold:g}",
            f"before: {self.before}",
            f"after:  {self.after}",
            f"{'query':<{width}} {'boxes before':>12} {'boxes after':>11} {'max score before':>16} "
            f"{'max score after':>15}",
        ]
        for column, query in enumerate(self.queries):
            mark = "  ← scores as an empty query" if self.scores_as_empty_query(query) else ""
            lines.append(
                f"{query:<{width}} {self.total_boxes(query, 'before'):>12} {self.total_boxes(query, 'after'):>11} "
                f"{self.max_score_before[column]:>16.4f} {self.max_score_after[column]:>15.4f}{mark}"
            )
        floor, kept = max(self.empty_query_score), sum(self.empty_query_boxes)
        verdict = (
            "so a forgotten query is returned for no box"
            if kept == 0
            else f"{kept} boxes pass on that score alone, so a forgotten query can still label boxes that no other "
            f"query scores higher; raise the threshold above {floor:.4f} to drop them all"
        )
        lines.append(f"an empty query (what a forgotten query falls to) scores up to {floor:.4f} on a box: {verdict}.")
        return "\n".join(lines)


def detector_family(model: nn.Module) -> DualEncoderFamily:
    """The family of ``model`` (or of a peft wrapper of it) if it is a supported open-vocabulary detector."""
    family = find_family(model)
    if family is None or not family.detector:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise ValueError(
            f"{type(base).__name__} is not an open-vocabulary detector this evaluation supports; give one of "
            f"{', '.join(DETECTOR_CLASSES)}."
        )
    return family


def evaluate_detection(
    model: nn.Module,
    processor,
    images: Sequence,
    queries: Sequence[str],
    *,
    threshold: float = 0.1,
    reference: nn.Module | None = None,
    image_names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> DetectionReport:
    """Count the boxes the detector's processor labels with each query, before and after an edit.

    Args:
        model: the edited detector: a peft model with forget adapter(s), whose "before" column is the same model
            under ``disable_adapter()``; or, with ``reference``, any detector (a merged checkpoint).
        processor: the detector's own processor (``OwlViTProcessor``/``Owlv2Processor``): it prepares the queries
            and images and post-processes the output.
        images: PIL images.
        queries: the text queries, asked on every image (as in OWL's ``text=[queries] * len(images)``).
        threshold: the post-processing score threshold in [0, 1).
        reference: the unedited detector for the "before" column (instead of disabling the adapters of ``model``).
        image_names: a name per image for the report (default ``"image <i>"``).
        batch_size: images per forward pass.

    Raises:
        ValueError: a model that is not a supported detector, a model with neither adapters nor ``reference``, a
            processor without detection post-processing, or empty or malformed queries, images or threshold.
    """
    family = detector_family(model)
    if reference is not None:
        detector_family(reference)
    elif not getattr(model, "peft_config", None):
        raise ValueError(
            "The model has no adapter to disable for the 'before' column: pass the edited model (with its forget "
            "adapters), or pass the unedited detector as `reference=`."
        )
    queries, names = _checked_inputs(processor, images, queries, threshold, image_names, batch_size)
    if reference is not None:
        before = _detect(reference, family, processor, images, queries, threshold, batch_size)
        before_name = "the reference model"
    else:
        before, before_name = _detect_unedited(model, family, processor, images, queries, threshold, batch_size)
    after = _detect(model, family, processor, images, queries, threshold, batch_size)
    return DetectionReport(
        queries=tuple(queries),
        images=tuple(names),
        threshold=float(threshold),
        boxes_before=before["boxes"],
        boxes_after=after["boxes"],
        max_score_before=before["max_score"],
        max_score_after=after["max_score"],
        gap_to_empty_before=before["gap"],
        gap_to_empty_after=after["gap"],
        empty_query_score=after["empty_score"],
        empty_query_boxes=after["empty_boxes"],
        before=before_name,
        after="the edited model" if reference is None else "the model",
    )


def _checked_inputs(processor, images, queries, threshold, image_names, batch_size):
    if not hasattr(processor, "post_process_grounded_object_detection"):
        raise ValueError(
            f"{type(processor).__name__} has no `post_process_grounded_object_detection`: pass the detector's own "
            "processor (AutoProcessor.from_pretrained(<checkpoint>)), which prepares queries and images and turns "
            "the output into labelled boxes."
        )
    queries = [query.strip() for query in queries] if not isinstance(queries, str) else None
    if not queries or not all(queries) or len(set(queries)) != len(queries):
        raise ValueError("`queries` must be a non-empty list of distinct, non-empty strings.")
    if not images:
        raise ValueError("`images` is empty: give at least one image.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"`threshold` must be a score in [0, 1), got {threshold!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    names = list(image_names) if image_names is not None else [f"image {i}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} `image_names` for {len(images)} images: give one name per image.")
    return queries, names


def _detect_unedited(model, family, processor, images, queries, threshold, batch_size) -> tuple[dict, str]:
    """:func:`_detect` on ``model`` with its adapters disabled; merged adapters are merged again afterwards (peft's
    ``disable_adapter`` unmerges them and leaves them unmerged), so the model is left as it was given."""
    merged = list(dict.fromkeys(name for m in model.modules() for name in getattr(m, "merged_adapters", ())))
    try:
        with model.disable_adapter():
            before = _detect(model, family, processor, images, queries, threshold, batch_size)
    finally:
        if merged and not any(getattr(m, "merged_adapters", None) for m in model.modules()):
            model.merge_adapter(merged)
    return before, "the model with its adapters disabled"


def _detect(model, family, processor, images, queries, threshold, batch_size) -> dict[str, tuple]:
    """Counts, highest scores and gaps to the empty query of ``model`` (as it is now) on every image."""
    boxes, empty_score, empty_boxes = [], [], []
    max_logit = torch.full((len(queries),), -math.inf)
    gap = torch.zeros(len(queries))
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        output = _forward(model, processor, batch, queries)
        empty = _empty_query_logits(model, family, output)  # (images, boxes)
        logits = output.logits.float()  # (images, boxes, queries)
        results = processor.post_process_grounded_object_detection(outputs=output, threshold=threshold)
        for result in results:
            labels = Counter(result["labels"].tolist())  # one pass over the boxes, not one per query
            boxes.append(tuple(labels.get(column, 0) for column in range(len(queries))))
        max_logit = torch.maximum(max_logit, logits.amax(dim=(0, 1)).cpu())
        gap = torch.maximum(gap, (logits - empty[..., None]).abs().amax(dim=(0, 1)).cpu())
        empty_score.extend(torch.sigmoid(empty.amax(dim=1)).tolist())
        empty_boxes.extend((torch.sigmoid(empty) > threshold).sum(dim=1).tolist())
    return {
        "boxes": tuple(boxes),
        "max_score": tuple(torch.sigmoid(max_logit).tolist()),
        "gap": tuple(gap.tolist()),
        "empty_score": tuple(empty_score),
        "empty_boxes": tuple(int(n) for n in empty_boxes),
    }


def _forward(model, processor, images, queries):
    parameter = next(model.parameters())
    inputs = processor(text=[list(queries)] * len(images), images=images, return_tensors="pt")
    inputs = {
        key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
        for key, value in inputs.items()
    }
    with torch.no_grad():
        return model(**inputs)


def _empty_query_logits(model, family: DualEncoderFamily, output) -> Tensor:
    """``(images, boxes)`` logits of a query with no direction (all zeros) through the family's box classifier."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classify = base
    for part in family.image.features.split("."):  # the family's box classifier, ``class_predictor`` for OWL
        classify = getattr(classify, part)
    features = output.image_embeds.reshape(output.image_embeds.shape[0], -1, output.image_embeds.shape[-1])
    empty = torch.zeros(
        features.shape[0], 1, output.text_embeds.shape[-1], dtype=features.dtype, device=features.device
    )
    with torch.no_grad():
        logits, _ = classify(features, empty, None)  # (image features, query embeddings, query mask)
    return logits[..., 0].float()


__all__ = ["DETECTOR_CLASSES", "EMPTY_QUERY_TOLERANCE", "DetectionReport", "detector_family", "evaluate_detection"]
