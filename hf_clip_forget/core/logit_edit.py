"""The logit-constrained edit: lower one class's logit where its forget prompts point, and no other logit anywhere.

A zero-shot classifier scores an image embedding ``v`` against class directions ``t_c`` (the rows of ``T``, one per
candidate class). An image-side edit ``v ↦ M v`` with ``M = I − Σ_k w_k b_kᵀ`` changes the logits by
``t_cᵀ M v − t_cᵀ v = −Σ_k (t_cᵀ w_k)(b_kᵀ v)``. Taking each ``w_k`` as the *dual vector* of class ``k`` — the
column ``k`` of ``T⁺``, so ``t_cᵀ w_k = [c = k]`` — makes the edit move **only the forgotten classes' logits**, each by
``−b_kᵀ v``, and leave every other class's logit exactly as it was, for every input.

What remains is the *detector* ``b_k``: the direction along which the class's logit falls. It solves

    min_b  ‖b‖² + μ ‖K b‖²    subject to   F_k b = δ_k,

where the rows of ``F_k`` are the forget keys of class ``k`` (e.g. the prompts of "a sketch of a dog"), the rows of
``K`` the kept keys (the prompts of every cell whose predictions must not move: the class in the kept domains, the
plain class prompts…), and ``δ_{k,j} = max(0, t_kᵀ f_j − max_{c≠k} t_cᵀ f_j + margin)`` is how far the class's
logit must fall on forget key ``j`` to sit ``margin`` below the best other class there. In closed form, with
``A = I + μ KᵀK``,

    b_k = A⁻¹ F_kᵀ (F_k A⁻¹ F_kᵀ)⁻¹ δ_k,

so that ``t_kᵀ M f_j = t_kᵀ f_j − δ_{k,j}`` exactly on every forget key, and ``μ ‖K b_k‖² ≤ δ_kᵀ (F_k A⁻¹ F_kᵀ)⁻¹
δ_k``: the larger ``μ``, the less the class's logit moves on the kept keys. The edit has rank (at most) the number
of forgotten classes whatever the number of keys.

Compared with CCUP (:func:`~hf_clip_forget.core.subspace.ccup_edit`), which removes the forget *prompts'* direction
— content of the class included — from what every classifier sees, this edit lowers the forgotten class along what
distinguishes its forget prompts from the kept ones (for "sketch of a dog" with the photo, painting and cartoon dogs
kept: mostly "sketch"), and cannot change any other class's score. ``docs/domains.md`` measures both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .subspace import LowRankEdit, _as_rows, check_nonnegative


def class_dual_vectors(classifier: Tensor) -> Tensor:
    """``(d, C)`` dual vectors ``W = T⁺`` of the ``(C, d)`` classifier rows ``T``: ``T W = I``, so ``t_cᵀ w_k =
    [c = k]`` (float64). Raises when two classes' directions are linearly dependent (no edit can then move one's
    logit and not the other's)."""
    rows = _as_rows(classifier, "classifier").to(torch.float64)
    if rows.shape[0] > rows.shape[1]:
        raise ValueError(
            f"{rows.shape[0]} classes in a {rows.shape[1]}-d space: their directions cannot be independent, so no "
            "linear edit can move one class's logit alone."
        )
    singular = torch.linalg.svdvals(rows)
    if singular[-1] <= singular[0] * 1e-6:
        raise ValueError(
            "The classifier's class directions are (nearly) linearly dependent: no linear edit can lower one class's "
            "logit and keep the others'. Check for duplicate or synonymous class names."
        )
    return torch.linalg.pinv(rows)


def logit_drops(classifier: Tensor, forget_class: int, forget_keys: Tensor, margin: float) -> Tensor:
    """``δ_j = max(0, t_kᵀ f_j − max_{c≠k} t_cᵀ f_j + margin)``: how far class ``forget_class``'s logit must fall on
    each forget key to sit ``margin`` below the best other class there."""
    logits = _as_rows(forget_keys, "forget_keys").to(torch.float64) @ classifier.to(torch.float64).T
    others = torch.cat([logits[:, :forget_class], logits[:, forget_class + 1 :]], dim=1)
    return (logits[:, forget_class] - others.max(dim=1).values + margin).clamp(min=0.0)


def logit_constrained_edit(
    classifier: Tensor,
    forget_keys: Mapping[int, Tensor],
    kept_keys: Tensor | None,
    *,
    mu: float,
    margin: float,
) -> LowRankEdit:
    """The image-side edit ``M = I − Σ_k w_k b_kᵀ`` of the module docstring.

    Args:
        classifier: ``(C, d)`` class directions ``T`` of the zero-shot classifier (e.g. each class's prompts
            averaged and normalised); every forgotten class is one of its rows.
        forget_keys: ``{class index k: (n_k, d) forget keys of class k}``, e.g. the normalised prompt embeddings of
            each forgotten (class, domain) cell.
        kept_keys: ``(r, d)`` keys whose logits must hold (rows), or ``None``.
        mu: weight ``μ ≥ 0`` of the kept keys.
        margin: how far below the best other class (in cosine units of the classifier) the forgotten class's logit
            must fall on each forget key; ``≥ 0``.

    Returns:
        A :class:`~hf_clip_forget.core.subspace.LowRankEdit` (float64) of rank ``len(forget_keys)``; an image
        embedding ``v`` becomes ``edit.apply(v)``, a projection weight ``W`` becomes ``edit.apply_to_weight(W)``.
    """
    check_nonnegative(mu, "mu")
    check_nonnegative(margin, "margin")
    rows = _as_rows(classifier, "classifier").to(torch.float64)
    if not forget_keys:
        raise ValueError("`forget_keys` is empty: name at least one forgotten class and its keys.")
    bad = [k for k in forget_keys if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < rows.shape[0]]
    if bad:
        raise ValueError(f"`forget_keys` indexes classes {bad}, not rows of the {rows.shape[0]}-class classifier.")
    dim = rows.shape[1]
    duals = class_dual_vectors(rows)
    inverse = _kept_inverse(kept_keys, mu, dim)
    lefts, rights = [], []
    for k in sorted(forget_keys):
        keys = _as_rows(forget_keys[k], f"forget_keys[{k}]").to(torch.float64)
        if keys.shape[1] != dim:
            raise ValueError(f"`forget_keys[{k}]` has dimension {keys.shape[1]}, the classifier {dim}.")
        lefts.append(duals[:, k])
        rights.append(_detector(keys, inverse, logit_drops(rows, k, keys, margin)))
    return LowRankEdit(torch.stack(lefts, dim=1), torch.stack(rights, dim=1))


def _kept_inverse(kept_keys: Tensor | None, mu: float, dim: int) -> Tensor:
    """``A⁻¹ = (I + μ KᵀK)⁻¹`` (float64)."""
    eye = torch.eye(dim, dtype=torch.float64)
    if kept_keys is None or mu == 0:
        return eye
    kept = _as_rows(kept_keys, "kept_keys").to(torch.float64)
    if kept.shape[1] != dim:
        raise ValueError(f"`kept_keys` has dimension {kept.shape[1]}, the classifier {dim}.")
    return torch.linalg.inv(eye + mu * kept.T @ kept)


def _detector(keys: Tensor, inverse: Tensor, drops: Tensor) -> Tensor:
    """``b = A⁻¹ Fᵀ (F A⁻¹ Fᵀ)⁻¹ δ``: the smallest ``bᵀ A b`` with ``F b = δ`` (least squares where the forget keys
    are linearly dependent, e.g. two prompts with the same embedding)."""
    inverse_keys = inverse @ keys.T
    gram = keys @ inverse_keys
    coefficients = torch.linalg.lstsq(gram, drops[:, None]).solution[:, 0]
    return inverse_keys @ coefficients
