"""Zero-shot accuracy reports: one model (:class:`ZeroShotReport`), before/after an edit (:class:`ForgettingReport`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hub import ForgetEvaluation
from .features import ImageFeatures
from .metric import load_forgetting_metric


@dataclass(frozen=True)
class ZeroShotReport:
    """Zero-shot accuracies of one model on one labelled image set (fractions in [0, 1]).

    Attributes:
        accuracy: over all images.
        forget_accuracy: over the images of the forgotten classes (``None`` without forget classes).
        retain_accuracy: over the other images (``None`` without forget classes, or if there are no others).
        per_class: class name → accuracy over its images (classes with images only, in label order).
        per_domain_class: ``"<domain>/<class>"`` → accuracy (only when the dataset has a domain column).
        num_images: how many images were classified.
        forget_classes: the forgotten classes.
    """

    accuracy: float
    forget_accuracy: float | None
    retain_accuracy: float | None
    per_class: dict[str, float]
    per_domain_class: dict[str, float] | None
    num_images: int
    forget_classes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``per_domain_class`` only when there are domains."""
        result = {
            "accuracy": self.accuracy,
            "forget_accuracy": self.forget_accuracy,
            "retain_accuracy": self.retain_accuracy,
            "per_class": dict(self.per_class),
            "num_images": self.num_images,
            "forget_classes": list(self.forget_classes),
        }
        if self.per_domain_class is not None:
            result["per_domain_class"] = dict(self.per_domain_class)
        return result


@dataclass(frozen=True)
class ForgettingReport:
    """Zero-shot accuracies of a model before and after a forget edit, on the same images."""

    before: ZeroShotReport
    after: ZeroShotReport

    def to_dict(self) -> dict[str, Any]:
        """``{"before": {...}, "after": {...}}``, each as :meth:`ZeroShotReport.to_dict`."""
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}

    def to_forget_evaluation(
        self, dataset_name: str, dataset_type: str | None = None, split: str = "test"
    ) -> ForgetEvaluation:
        """The report as a :class:`hf_clip_forget.hub.ForgetEvaluation`, for model cards (``write_model_card``,
        ``push_to_hub(evaluations=...)``).

        Args:
            dataset_name: the dataset's display name, e.g. ``"PACS"``.
            dataset_type: its Hub id (the ``model-index`` dataset type); defaults to ``dataset_name``.
            split: the split evaluated.
        """
        values = {
            "forget_accuracy_before": self.before.forget_accuracy,
            "forget_accuracy_after": self.after.forget_accuracy,
            "retain_accuracy_before": self.before.retain_accuracy,
            "retain_accuracy_after": self.after.retain_accuracy,
        }
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise ValueError(
                f"A model-card evaluation needs forget and retain accuracies, but {missing} are undefined: evaluate "
                "with `forget_classes` that leave images of other classes in the dataset."
            )
        return ForgetEvaluation(
            dataset_name=dataset_name, dataset_type=dataset_type or dataset_name, split=split, **values
        )


@dataclass(frozen=True)
class CellChange:
    """A forgotten class in one domain (``"sketch/dog"``), or pooled over the kept domains, before and after an edit.

    ``role``: ``"forgotten cell"`` (a domain the edit forgets the class in), ``"kept domain"`` (one where it keeps
    it) or ``"pooled"`` (the kept domains together, weighted by their images)."""

    name: str
    role: str
    before: float
    after: float


def forgotten_class_cells(
    before: dict[str, float],
    after: dict[str, float],
    forget_classes: Sequence[str],
    forget_domains: Sequence[str] | None = None,
    images: dict[str, int] | None = None,
) -> list[CellChange]:
    """The (domain, class) cells of the forgotten classes, before → after (``per_domain_class`` of two
    :class:`ZeroShotReport`): first the forgotten cells (every domain when ``forget_domains`` is ``None``: a global
    edit), then the class in the kept domains, cell by cell and, given the images per cell, pooled. A pooled number
    over every domain hides the forgotten cell; these rows show it."""
    classes, domains = set(forget_classes), None if forget_domains is None else set(forget_domains)
    cells = [name for name in before if name.split("/", 1)[1] in classes and name in after]
    forgotten = [n for n in cells if domains is None or n.split("/", 1)[0] in domains]
    kept = [n for n in cells if domains is not None and n.split("/", 1)[0] not in domains]
    rows = [CellChange(n, "forgotten cell", before[n], after[n]) for n in forgotten]
    rows += [CellChange(n, "kept domain", before[n], after[n]) for n in kept]
    kept_of: dict[str, list[str]] = {}  # class → its kept cells with images, in one pass
    for n in kept if images else ():
        if images.get(n):
            kept_of.setdefault(n.split("/", 1)[1], []).append(n)
    for name in forget_classes if images and kept else ():
        own = kept_of.get(name, [])
        total = sum(images[n] for n in own)
        if len(own) > 1 and total:
            pooled = [sum(images[n] * side[n] for n in own) / total for side in (before, after)]
            rows.append(CellChange(f"{name} in the kept domains", "pooled", *pooled))
    return rows


def images_per_cell(features: ImageFeatures) -> dict[str, int] | None:
    """``"<domain>/<class>"`` → number of images (``None`` when the features have no domains)."""
    if features.domains is None:
        return None
    num_classes = len(features.class_names)
    counts = torch.bincount(
        features.domains * num_classes + features.labels, minlength=num_classes * len(features.domain_names)
    )
    names = [f"{domain}/{name}" for domain in features.domain_names for name in features.class_names]
    return {name: int(count) for name, count in zip(names, counts.tolist(), strict=True) if count}


def _group_accuracies(correct: Tensor, groups: Tensor, names: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(groups, minlength=len(names))
    hits = torch.bincount(groups, weights=correct.double(), minlength=len(names))
    return {names[i]: float(hits[i] / counts[i]) for i in range(len(names)) if counts[i] > 0}


def score_predictions(
    predictions: Tensor, features: ImageFeatures, forget_classes: Sequence[str] = (), metric=None
) -> ZeroShotReport:
    """The :class:`ZeroShotReport` of ``predictions`` (``(n,)`` class indices) against ``features``' labels.

    Accuracy, forget and retain accuracy come from the ``forgetting_accuracy`` metric (``metric``, or a freshly
    loaded one); per-class and per-domain accuracies are counted here.
    """
    predictions = predictions.cpu().long()
    if predictions.shape != features.labels.shape:
        raise ValueError(f"Got {predictions.shape[0]} predictions for {len(features)} images.")
    position = {name: i for i, name in enumerate(features.class_names)}
    forget_ids = [position[name] for name in forget_classes]
    metric = metric if metric is not None else load_forgetting_metric()
    scores = metric.compute(
        predictions=predictions.tolist(), references=features.labels.tolist(), forget_labels=forget_ids
    )
    correct = predictions == features.labels
    per_domain_class = None
    if features.domains is not None:
        num_classes = len(features.class_names)
        names = [f"{domain}/{name}" for domain in features.domain_names for name in features.class_names]
        per_domain_class = _group_accuracies(correct, features.domains * num_classes + features.labels, names)
    return ZeroShotReport(
        accuracy=scores["accuracy"],
        forget_accuracy=scores["forget_accuracy"],
        retain_accuracy=scores["retain_accuracy"],
        per_class=_group_accuracies(correct, features.labels, features.class_names),
        per_domain_class=per_domain_class,
        num_images=len(features),
        forget_classes=tuple(forget_classes),
    )
