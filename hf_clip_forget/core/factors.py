"""From class embeddings to the thin factors one adapter stores for one projection layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .subspace import (
    DEFAULT_RANK_TOLERANCE,
    EDIT_METHODS,
    gram_factor,
    normalize_rows,
    orthonormal_basis,
    remove_span,
    shared_direction,
)


@dataclass(frozen=True)
class EditFactors:
    """The stored state of one adapter on one layer (float64 here; the adapter keeps float32 copies).

    Attributes:
        forget: ``(d, k)``; for ``"nullspace"`` an orthonormal basis ``Q`` of the forget subspace, for ``"ccup"`` a
            Gram factor ``F`` with ``F Fᵀ = T_f T_fᵀ``.
        retain: ``(d, r)`` Gram factor of the retain set (``"ccup"`` only), or ``None``.
    """

    forget: Tensor
    retain: Tensor | None = None


def build_edit_factors(
    method: str,
    forget_embeds: Tensor,
    retain_embeds: Tensor | None = None,
    anchor_embeds: Tensor | None = None,
    rtol: float = DEFAULT_RANK_TOLERANCE,
    keep_shared_direction: bool = False,
    extra_forget_embeds: Tensor | None = None,
) -> EditFactors:
    """Factors of a forget edit from row embeddings.

    Image side (``anchor_embeds is None``): the forget directions are the normalised forget embeddings ``T_f``.

    Text side (``anchor_embeds`` given, e.g. the embedding of the bare template "a photo of a ."): projecting the
    text features onto the nullspace of ``T_f`` would send the forgotten prompts to ~0, which the model then
    renormalises into a random direction. Instead the forget directions are the parts of ``T_f`` orthogonal to the
    kept span ``K = span(anchor, T_r)``: the edit maps a forgotten prompt onto its projection in ``K`` (it becomes
    a generic prompt), and leaves the anchor and the retain prompts exactly unchanged.

    ``keep_shared_direction`` (image side, needs ``retain_embeds``): the forget directions are taken orthogonal to the
    direction ``s`` shared by all named classes (:func:`~hf_clip_forget.core.subspace.shared_direction` of forget and
    retain embeddings), and CCUP also keeps ``s``. A forgotten class's logit then falls to about the mean logit
    instead of 0, while the other classes keep their common component.

    ``extra_forget_embeds``: further directions to forget (other names of the forgotten classes) that do not count
    as classes: they join the forget set after the shared direction is computed from the classes alone.
    """
    if method not in EDIT_METHODS:
        raise ValueError(f"`method` must be one of {EDIT_METHODS}, got {method!r}.")
    if method == "logit":
        raise ValueError(
            "Logit-constrained factors depend on the classifier and on each forgotten class's own keys, not on two "
            "stacks of embeddings: build them with `hf_clip_forget.core.logit_constrained_edit`."
        )
    forget = normalize_rows(forget_embeds)
    retain = normalize_rows(retain_embeds) if retain_embeds is not None else None
    if keep_shared_direction:
        if anchor_embeds is not None:
            raise ValueError("`keep_shared_direction` applies to image-side edits only (no `anchor_embeds`).")
        if retain is None:
            raise ValueError(
                "`keep_shared_direction` needs the retain classes: the shared direction is the mean of all named "
                "classes. Pass `retain_classes` (e.g. the other candidate classes), or keep_shared_direction=False."
            )
        basis = shared_direction(torch.cat([forget, retain]))[:, None]
        if extra_forget_embeds is not None:
            forget = torch.cat([forget, normalize_rows(extra_forget_embeds)])
        distinctive = remove_span(forget, basis)
        if (distinctive.norm(dim=1) < 1e-6).any():
            raise ValueError(
                "A forget embedding is parallel to the direction all classes share, so it cannot be removed while "
                "that direction is kept; pass keep_shared_direction=False."
            )
        forget = normalize_rows(distinctive)
        retain = torch.cat([retain, basis.T])
    elif extra_forget_embeds is not None:
        forget = torch.cat([forget, normalize_rows(extra_forget_embeds)])
    if anchor_embeds is not None:
        kept_rows = normalize_rows(anchor_embeds)
        if retain is not None:
            kept_rows = torch.cat([kept_rows, retain])
        distinctive = remove_span(forget, orthonormal_basis(kept_rows, rtol=rtol))
        too_small = distinctive.norm(dim=1) < 1e-6
        if too_small.any():
            raise ValueError(
                "Some forget prompts lie entirely in the span of the anchor and retain prompts, so a text-side edit "
                "cannot separate them; remove them from the retain set or edit the image side (target='visual')."
            )
        forget = normalize_rows(distinctive)
        retain = kept_rows
    if method == "nullspace":
        factors = EditFactors(orthonormal_basis(forget, rtol=rtol))
    else:
        factors = EditFactors(
            gram_factor(forget, rtol=rtol), gram_factor(retain, rtol=rtol) if retain is not None else None
        )
    refuse_forgetting_everything(factors, method)
    return factors


def refuse_forgetting_everything(factors: EditFactors, method: str) -> None:
    """Raise a ``ValueError`` when the forget directions span the whole embedding space and nothing is kept.

    Then no class is left to recognise: a nullspace edit ``I − α QQᵀ`` with ``Q`` of full rank is ``(1 − α) I``
    (every embedding mapped to ~0 at α = 1, e.g. to norm 5e-7 on the tiny test model; scaled alike otherwise,
    which changes no prediction), and a CCUP edit with no retain set shrinks every direction. A CCUP edit that keeps
    a retain set is a trade-off between the two sets and is allowed."""
    dim, rank = factors.forget.shape
    keeps_something = method == "ccup" and factors.retain is not None and factors.retain.shape[1] > 0
    if rank >= dim and not keeps_something:
        raise ValueError(
            f"The forget directions span the whole {dim}-dimensional embedding space (rank {rank} of {dim}), so no "
            "direction is left to keep: the edit would map every embedding to ~0 (or, with alpha < 1, scale all "
            "of them alike). Forgetting every class leaves a model that recognises nothing. Name fewer classes "
            f"(fewer than {dim} independent directions; with average_templates=False each template counts as one), "
            "or name the classes to keep with `retain_classes`."
        )
