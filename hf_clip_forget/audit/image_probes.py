"""Probes with labelled images: zero-shot under neighbour names and held-out prompts, retrieval, and a linear probe.

The images are embedded once (:class:`~hf_clip_forget.evaluation.ImageFeatures`); the edited and the unedited image
embeddings both come from the same cached features. The dataset's classes are the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import linear_probe, normalize_rows
from ..evaluation import ImageFeatures
from .report import GONE_MARGIN, AuditRow
from .setup import AuditSetup, EmbeddingSpace


@dataclass(frozen=True)
class ImageSet:
    """The labelled images of an audit: cached features, normalised embeddings before/after, and the prompt name of
    each dataset class (``class_prompts`` applied)."""

    features: ImageFeatures
    before: Tensor
    after: Tensor
    prompt_names: tuple[str, ...]

    def images_of(self, prompt_name: str) -> Tensor:
        """Boolean mask of the images whose class is named ``prompt_name``."""
        classes = [i for i, name in enumerate(self.prompt_names) if name == prompt_name]
        return torch.isin(self.features.labels, torch.tensor(classes, dtype=torch.long))

    def embeddings(self, edited: bool) -> Tensor:
        return self.after if edited else self.before


def _names(images: ImageSet) -> list[str]:
    return list(dict.fromkeys(images.prompt_names))


def _recognised_share(images, space, mask, names, hits, templates, edited) -> float:
    classes = space.classes(names, templates, edited)
    predicted = (images.embeddings(edited)[mask] @ classes.T).argmax(dim=1)
    return float(torch.isin(predicted, torch.tensor(hits)).float().mean())


def zero_shot_rows(space: EmbeddingSpace, setup: AuditSetup, images: ImageSet, name: str) -> list[AuditRow]:
    """Accuracy on the class's images with its neighbours among the candidates (a prediction of the class or of any
    neighbour counts as recognised), and with held-out templates instead of the adapters' templates."""
    mask = images.images_of(name)
    base = _names(images)
    neighbours = [n for n in setup.neighbours.get(name, ()) if n not in base]
    names = [*base, *neighbours]
    hits = [names.index(name), *range(len(base), len(names))]
    rows = []
    for probe, candidates, recognised, templates, subject in (
        ("zero-shot with neighbours", names, hits, setup.templates, f"{len(neighbours)} neighbour names"),
        ("zero-shot, held-out prompts", base, [base.index(name)], setup.held_out, f"{len(setup.held_out)} templates"),
    ):
        before, after = (
            _recognised_share(images, space, mask, candidates, recognised, templates, edited)
            for edited in (False, True)
        )
        rows.append(
            AuditRow.judged(
                probe, name, subject, "share of the class's images recognised", before, after,
                len(recognised) / len(candidates),
            )
        )  # fmt: skip
    return rows


def retrieval_rows(space: EmbeddingSpace, setup: AuditSetup, images: ImageSet, name: str) -> list[AuditRow]:
    """Image→text: mean rank of the class's prompt for its images (1 = first). Text→image: R-precision of the class's
    images for its own prompt and each neighbour's (R = how many images the class has)."""
    mask = images.images_of(name)
    names = _names(images)
    index = names.index(name)
    ranks = []
    for edited in (False, True):
        scores = images.embeddings(edited)[mask] @ space.classes(names, setup.templates, edited).T
        ranks.append(float((scores > scores[:, index : index + 1]).sum(dim=1).float().add(1).mean()))
    chance = (len(names) + 1) / 2
    rows = [
        AuditRow.judged(
            "image→text rank", name, f"among {len(names)} class prompts", "mean rank of the class's prompt",
            ranks[0], ranks[1], chance, higher_is_recognised=False, tolerance=GONE_MARGIN * (chance - 1),
        )
    ]  # fmt: skip
    relevant = int(mask.sum())
    for query in (name, *setup.neighbours.get(name, ())):
        precision = []
        for edited in (False, True):
            scores = images.embeddings(edited) @ space.classes([query], setup.templates, edited)[0]
            top = torch.topk(scores, relevant).indices
            precision.append(float(mask[top].float().mean()))
        rows.append(
            AuditRow.judged(
                "text→image R-precision", name, f"prompt: {query}", f"share of the class's images in the top {relevant}",
                precision[0], precision[1], relevant / len(mask),
            )
        )  # fmt: skip
    return rows


def linear_probe_rows(images: ImageSet, name: str, seed: int = 0) -> list[AuditRow]:
    """A logistic-regression probe separating the class's images from the rest: on the image embeddings before and
    after the edit, and on the cached tower features (untouched by the edit, so equal before and after)."""
    mask = images.images_of(name)
    before, after = (linear_probe(images.embeddings(edited), mask, seed=seed) for edited in (False, True))
    tower = linear_probe(images.features.features, mask, seed=seed)
    return [
        AuditRow.judged(
            "linear probe", name, "image embeddings", "balanced accuracy of a fresh probe (held-out part)",
            before.balanced_accuracy, after.balanced_accuracy, 0.5,
            details={"test_images": before.positives_test + before.negatives_test},
        ),
        AuditRow(
            "linear probe", name, "tower features (before the edited layer)",
            "balanced accuracy of a fresh probe (held-out part)", tower.balanced_accuracy, tower.balanced_accuracy,
            0.5, "unchanged (expected)",
            note="the edit does not touch the towers: what they know about the class is still there",
        ),
    ]  # fmt: skip


def image_rows(space: EmbeddingSpace, setup: AuditSetup, images: ImageSet) -> list[AuditRow]:
    """Every image probe for every forgotten class; a skipped row for a class without images or competitors."""
    rows = []
    for name in setup.forgotten:
        count = int(images.images_of(name).sum())
        why = _why_not(images, name, count)
        if why:
            rows.append(AuditRow.skipped("image probes", name, "", why))
            continue
        rows += zero_shot_rows(space, setup, images, name)
        rows += retrieval_rows(space, setup, images, name)
        rows += linear_probe_rows(images, name)
    return rows


def _why_not(images: ImageSet, name: str, count: int) -> str:
    if name not in images.prompt_names:
        return (
            f"{name!r} is not a class of the data ({', '.join(_names(images))}); map a dataset class to it with "
            "`class_prompts=`"
        )
    if count < 4:
        return f"the data has {count} image(s) of {name!r}; the image probes need at least 4"
    if len(_names(images)) < 2:
        return "the data has no other class to compete with"
    return ""


def image_set(features: ImageFeatures, before: Tensor, after: Tensor, prompt_names: Sequence[str]) -> ImageSet:
    """An :class:`ImageSet` from cached features and their (unnormalised) embeddings before and after."""
    return ImageSet(features, normalize_rows(before.float()), normalize_rows(after.float()), tuple(prompt_names))


__all__ = ["ImageSet", "image_rows", "image_set", "linear_probe_rows", "retrieval_rows", "zero_shot_rows"]
