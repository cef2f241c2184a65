"""Data-free probes: does a forgotten class come back under held-out prompts, another name, or in its logit margin?

Each probe classifies *text proxies* of the forgotten class — held-out prompts about it embedded by the unedited text
tower, with the image-side edit applied after the edit (:class:`~.setup.EmbeddingSpace`) — among class embeddings
built as zero-shot classification builds them (the adapters' templates), before and after the edit.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..core import fill_templates
from .report import AuditRow
from .setup import AuditSetup, EmbeddingSpace


def _wins(proxies: Tensor, classes: Tensor, index: int) -> Tensor:
    return (proxies @ classes.T).argmax(dim=1) == index


def _win_rates(space: EmbeddingSpace, texts: Sequence[str], names: Sequence[str], index: int, templates):
    """Per proxy text, whether ``names[index]`` wins among ``names``: ``(before, after)`` boolean tensors."""
    return tuple(
        _wins(space.proxies(texts, edited), space.classes(names, templates, edited), index) for edited in (False, True)
    )


def held_out_prompt_rows(space: EmbeddingSpace, setup: AuditSetup) -> list[AuditRow]:
    """Per forgotten class: share of held-out prompts (and of the user's descriptions) on which it still wins."""
    rows = []
    names = list(setup.candidates)
    position = {n: i for i, n in enumerate(names)}
    for name in setup.forgotten:
        if len(names) < 2:
            rows.append(AuditRow.skipped("held-out prompts", name, "", _NO_COMPETITORS))
            continue
        trials = [(f"{len(setup.held_out)} held-out templates", fill_templates(name, setup.held_out), setup.held_out)]
        if setup.descriptions.get(name):
            trials.append((f"{len(setup.descriptions[name])} descriptions", list(setup.descriptions[name]), None))
        for subject, texts, labels in trials:
            before, after = _win_rates(space, texts, names, position[name], setup.templates)
            labels = labels or texts
            rows.append(
                AuditRow.judged(
                    "held-out prompts", name, subject, "share of prompts on which the class still wins",
                    before.float().mean(), after.float().mean(), 1 / len(names),
                    details={label: [bool(b), bool(a)] for label, b, a in zip(labels, before, after, strict=True)},
                )
            )  # fmt: skip
    return rows


def neighbour_rows(space: EmbeddingSpace, setup: AuditSetup) -> list[AuditRow]:
    """Per forgotten class and neighbour name: share of held-out proxies classified as the neighbour, when the
    neighbour replaces the class among the candidates ("is the class reachable under another name?")."""
    rows = []
    for name in setup.forgotten:
        others = [c for c in setup.candidates if c != name]
        texts = fill_templates(name, setup.held_out)
        for neighbour in setup.neighbours.get(name, ()):
            names = [*others, neighbour]
            before, after = _win_rates(space, texts, names, len(names) - 1, setup.templates)
            rows.append(
                AuditRow.judged(
                    "neighbour name", name, neighbour, "share of held-out proxies recognised as this name",
                    before.float().mean(), after.float().mean(), 1 / len(names),
                )
            )  # fmt: skip
        if not setup.neighbours.get(name):
            rows.append(AuditRow.skipped("neighbour name", name, "", "no neighbour names were given or found"))
    return rows


def margin_rows(space: EmbeddingSpace, setup: AuditSetup) -> list[AuditRow]:
    """Per forgotten class: mean cosine margin of its held-out proxies between the class and the best other class
    (> 0: the class is still on top; the class counts as gone once the margin is <= 0)."""
    rows = []
    names = list(setup.candidates)
    position = {n: i for i, n in enumerate(names)}
    for name in setup.forgotten:
        if len(names) < 2:
            rows.append(AuditRow.skipped("logit margin", name, "", _NO_COMPETITORS))
            continue
        index = position[name]
        margins = []
        for edited in (False, True):
            scores = (
                space.proxies(fill_templates(name, setup.held_out), edited)
                @ space.classes(names, setup.templates, edited).T
            )
            others = scores.clone()
            others[:, index] = float("-inf")
            margins.append((scores[:, index] - others.max(dim=1).values).mean())
        rows.append(
            AuditRow.judged(
                "logit margin", name, f"{len(setup.held_out)} held-out templates",
                "mean cosine margin over the best other class", margins[0], margins[1], 0.0, tolerance=0.0,
            )
        )  # fmt: skip
    return rows


_NO_COMPETITORS = (
    "no other class names to compete with: pass `candidate_classes=` (or build the adapter with retain classes)"
)


__all__ = ["held_out_prompt_rows", "margin_rows", "neighbour_rows"]
