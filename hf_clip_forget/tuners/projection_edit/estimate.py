"""The data-free effect estimate of a built adapter (:mod:`hf_clip_forget.core.effect`): which probes stand for the
forgotten and the kept cells, the estimate recorded in the adapter's ``provenance["effect_estimate"]``, and the
:class:`WeakEditWarning` when an uncalibrated domain-specific or text-side edit is predicted to change little."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ...core import HELD_OUT_TEMPLATES, DomainCell, EditFactors, EditSpec, compose_edits, normalize_rows
from ...core.effect import EditEffect, Probes, estimate_edit_effect
from .config import ProjectionEditConfig
from .embedder import Embedder, Embeddings


class WeakEditWarning(UserWarning):
    """A forget adapter built without calibration is predicted, from its prompts and prototypes alone, to change
    little for what it forgets (:mod:`hf_clip_forget.core.effect`; measured against real images in
    ``docs/domains.md``). The adapter is built as asked; its card and ``provenance["effect_estimate"]`` say what
    the estimate predicts. Silence it with ``warnings.simplefilter("ignore", WeakEditWarning)``."""


def estimate_built_effect(
    embedder: Embedder, embeddings: Embeddings, config: ProjectionEditConfig, factors: dict, text_side: dict
) -> EditEffect | None:
    """The estimate for the adapter ``factors`` (``{module: EditFactors}``) describe, built from ``embeddings``;
    ``None`` for an adapter built from vectors (no names, so no probes). ``text_side``: module → whether it is the
    family's text-side layer. Encodes only the held-out paraphrases of forgotten plain cells (image families)."""
    if config.embedding_source != "class_names":
        return None
    names = [*config.forgotten_classes, *config.retain_classes]
    index = {name: i for i, name in enumerate(names)}
    candidates = _candidates(embedder, embeddings, names)
    if embedder.inputs.retain_text_embeds is not None:
        candidates = torch.cat([candidates, normalize_rows(embedder.inputs.retain_text_embeds)])
    plan = embeddings.plan
    forget_cells = plan.forget if plan is not None else tuple(DomainCell(c) for c in config.forgotten_classes)
    retain_cells = plan.retain if plan is not None else tuple(DomainCell(c) for c in config.retain_classes)
    forgotten = _forgotten_probes(embedder, embeddings, forget_cells, index)
    forgotten_names = set(config.forgotten_classes)
    same = [cell for cell in retain_cells if cell.class_name in forgotten_names]
    others = [cell for cell in retain_cells if cell.class_name not in forgotten_names]
    edits = {side: None for side in (False, True)}
    for module, factor in factors.items():
        edits[text_side[module]] = _edit(config, factor, candidates.shape[1])
    directions = torch.stack(
        [
            normalize_rows(embeddings.prompts[c].mean(dim=0, keepdim=True))[0]
            for c in forget_cells
            if c in embeddings.prompts
        ]
        or [candidates[index[c]] for c in config.forgotten_classes]
    )
    return estimate_edit_effect(
        candidates, forgotten, forget_directions=directions, image_edit=edits[False], text_edit=edits[True],
        same_class_kept=_recorded_probes(embeddings, same, index),
        other_classes=_recorded_probes(embeddings, others, index),
    )  # fmt: skip


def _candidates(embedder: Embedder, embeddings: Embeddings, names: Sequence[str]) -> Tensor:
    """The zero-shot classifier: each class's plain prompts averaged (encoded now only when the build did not)."""
    missing = [name for name in names if DomainCell(name) not in embeddings.prompts]
    extra = dict(zip(missing, embedder.prompt_embeddings(missing, embedder.templates), strict=True)) if missing else {}
    rows = [embeddings.prompts.get(DomainCell(name), extra.get(name)) for name in names]
    return normalize_rows(torch.stack([prompts.mean(dim=0) for prompts in rows]))


def _forgotten_probes(embedder: Embedder, embeddings: Embeddings, cells, index: dict[str, int]) -> Probes:
    """The forget cells' prompts one at a time — held-out paraphrases for a plain cell of an image family, the
    domain prompts for a domain cell — and the forget cells' prototypes."""
    plain = [cell.class_name for cell in cells if cell.domain is None]
    held_out = bool(plain) and _image_family(embedder)
    groups: list[tuple[Tensor, list[int]]] = []
    if held_out:
        for name, prompts in zip(plain, embedder.prompt_embeddings(plain, HELD_OUT_TEMPLATES), strict=True):
            groups.append((prompts, [index[name]] * prompts.shape[0]))
    for cell in cells:
        if cell.domain is not None or not held_out:
            prompts = embeddings.prompts[cell]
            groups.append((prompts, [index[cell.class_name]] * prompts.shape[0]))
    if embeddings.prototypes is not None:
        prototypes, cell_of = embeddings.prototypes
        groups.append((prototypes, [index[cells[int(i)].class_name] for i in cell_of]))
    rows = torch.cat([group[0].to(torch.float64) for group in groups])
    return Probes(rows, torch.tensor([label for group in groups for label in group[1]], dtype=torch.long))


def _recorded_probes(embeddings: Embeddings, cells, index: dict[str, int]) -> Probes | None:
    cells = [cell for cell in cells if cell in embeddings.prompts]
    if not cells:
        return None
    rows = [embeddings.prompts[cell] for cell in cells]
    labels = [index[cell.class_name] for cell, prompts in zip(cells, rows, strict=True) for _ in range(len(prompts))]
    return Probes(torch.cat(rows), torch.tensor(labels, dtype=torch.long))


def _image_family(embedder: Embedder) -> bool:
    from ...families import family_of

    family = family_of(embedder.model)
    return family.inputs == "image" and not family.detector


def _edit(config: ProjectionEditConfig, factors: EditFactors, dim: int):
    """``M`` of this adapter alone on one layer (not transposed), as the layer composes it."""
    spec = EditSpec(
        name="estimate", method=config.method, forget=factors.forget, retain=factors.retain, alpha=config.alpha,
        ccup_lambda=config.ccup_lambda, ccup_mu=config.ccup_mu,
    )  # fmt: skip
    return compose_edits([spec], dim, rtol=config.rank_tolerance)


def effect_record(config: ProjectionEditConfig, effect: EditEffect) -> dict:
    """What ``provenance["effect_estimate"]`` holds: the estimate and the strength it was computed for."""
    return {**effect.to_dict(), "strength": config.strength}


def may_be_weak(config: ProjectionEditConfig, text_side: bool) -> bool:
    """Whether an edit of this kind can be predicted to change little, so that estimating it is worth its prompts:
    an uncalibrated domain-specific or text-side edit. A global image-side edit removes the span of the forgotten
    prompts from every image (measured in docs/forgetting.md); a calibrated edit was measured on images."""
    return not getattr(config, "calibration", None) and (config.paradigm != "global" or text_side)


def warn_if_weak(config: ProjectionEditConfig, effect: EditEffect | None, text_side: bool) -> None:
    """Warn (:class:`WeakEditWarning`) when an uncalibrated domain-specific or text-side edit is predicted to change
    little; say the predicted numbers and the fixes."""
    if effect is None or not effect.is_weak or not may_be_weak(config, text_side):
        return
    where = f" in {config.domains}" if config.paradigm != "global" else ""
    strength = config.describe_strength()
    if not config.retain_classes and config.paradigm != "global":
        fixes = [
            "name the other candidate classes (`retain_classes`, CLI `--retain-classes`): without them the edit "
            "cannot tell the class in this domain from the domain itself and keeps the class's own direction, so no "
            "strength helps (measured on PACS: unchanged at every μ from 1 to 1000)"
        ]
    elif config.method == "logit":
        fixes = [f"raise `logit_margin` (now {config.logit_margin:g}; higher forgets more and keeps less elsewhere)"]
    else:
        fixes = [
            "choose the strength on a few labelled images of your own with `hf_clip_forget.calibrate_forget_adapter` "
            "(CLI: `hf-clip-forget calibrate`)"
        ]
        if config.method == "ccup":
            fixes.append(f"or lower `ccup_mu` (now {config.ccup_mu:g}; lower forgets more and keeps less elsewhere)")
        if config.paradigm != "global" and not config.prototypes:
            fixes.append("or add visual prototypes (`prototypes=4`)")
    if text_side:
        fixes.append(
            f"or edit the image side (`target='visual'`): with {len(config.retain_classes)} retain classes the "
            "text side's kept span holds most of a forgotten prompt"
            if config.retain_classes
            else "or edit the image (or audio) side (`target='visual'`), which removes the forgotten prompts' span from "
            "every input"
        )
    warnings.warn(
        WeakEditWarning(
            f"The forget adapter for {list(config.forgotten_classes)}{where} (paradigm {config.paradigm!r}, "
            f"{strength}) is predicted to change little: data-free, {effect.summary()}. Fix: "
            + "; ".join(fixes)
            + ". (docs/domains.md measures what domain-specific forgetting reaches.)"
        ),
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised here to the first caller outside this package (the user's
    ``add_forget_adapter`` or ``get_peft_model`` call), however deep the package's own frames go."""
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def effect_estimate_line(config: ProjectionEditConfig) -> str | None:
    """What a model card says of ``config``'s recorded estimate (``provenance["effect_estimate"]``): one sentence, or
    ``None`` when there is none or it was computed for another strength than the config's (a stale estimate is
    never shown)."""
    record = (config.provenance or {}).get("effect_estimate")
    if not isinstance(record, dict) or not isinstance(record.get("forgotten"), dict):
        return None
    if record.get("strength") != config.strength or record.get("predicted_kept") is None:
        return None
    kept = record["predicted_kept"]
    measure = "logit" if record["forgotten"].get("margin_before") is None else "zero-shot margin"
    parts = [f"the forgotten cells' own prompts keep {100 * kept:.0f} % of their {measure}"]
    for label, key in (("the class in the kept cells", "same_class_kept"), ("the other classes", "other_classes")):
        group = record.get(key)
        if isinstance(group, dict) and group.get("margin_kept") is not None:
            parts.append(f"{label} {100 * group['margin_kept']:.0f} %")
    verdict = "**predicted to change little**" if record.get("weak") else "predicted to act"
    return (
        f"{verdict} (data-free estimate from prompts{' and prototypes' if config.prototypes else ''}, not a "
        f"measurement: {', '.join(parts)}; 100 % = unchanged, ≤ 0 = no longer recognised)"
    )
