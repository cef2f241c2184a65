"""Closed-form edits of a d-dimensional embedding space: bases, nullspace projectors, CCUP and their union.

Conventions. Embeddings are *rows*: a set of ``n`` vectors is an ``(n, d)`` tensor, as everywhere in torch.
Bases and factors are *columns*: ``Q`` is ``(d, k)``. An edit is a linear map ``M`` of the embedding space; for a
``torch.nn.Linear`` whose weight ``W`` is ``(d, n_in)``, editing the layer means ``W' = M W``, so that every output
``y = W x`` becomes ``M y``.

Every edit here has the low-rank form ``M = I - U Vᵀ`` (:class:`LowRankEdit`), so an adapter only stores two
thin ``(d, r)`` factors and applying it costs ``O(d r)`` per vector. All solves run in float64 whatever the
dtype of the inputs; results are returned in float64 and cast by the caller.

This module knows nothing of peft or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


EditMethod = Literal["nullspace", "ccup", "logit"]
EDIT_METHODS: tuple[str, ...] = ("nullspace", "ccup", "logit")

#: Default relative tolerance under which singular directions count as numerical noise.
DEFAULT_RANK_TOLERANCE = 1e-5


def _as_rows(vectors: Tensor, name: str = "vectors", check_finite: bool = True) -> Tensor:
    if not isinstance(vectors, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(vectors).__name__}.")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2:
        raise ValueError(f"`{name}` must be a (n, d) tensor of row vectors, got shape {tuple(vectors.shape)}.")
    if check_finite:
        _check_finite(vectors, name)
    return vectors.detach().to(torch.float64)


def _check_finite(vectors: Tensor, name: str) -> None:
    if not torch.isfinite(vectors).all():
        raise ValueError(f"`{name}` contains NaN or inf values; every embedding must be finite.")


def normalize_rows(vectors: Tensor) -> Tensor:
    """L2-normalise every row (float64). Raises on a zero row, which has no direction to forget or keep, and on NaN
    or inf values.

    A few passes over the rows in all, whatever their number: the finiteness check reads the row norms (a NaN or
    inf makes its row's norm NaN or inf; only then are the rows themselves checked), and a copy made to convert to
    float64 is divided in place."""
    rows = _as_rows(vectors, check_finite=False)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    if not torch.isfinite(norms).all():
        _check_finite(rows, "vectors")  # else finite rows too large to square: divided as before
    if (norms == 0).any():
        raise ValueError("A zero embedding has no direction; check the text embeddings you passed.")
    if rows is vectors or rows.untyped_storage().data_ptr() == vectors.untyped_storage().data_ptr():
        return rows / norms  # the caller's own float64 tensor: not overwritten
    return rows.div_(norms)


def _principal_directions(vectors: Tensor, rtol: float, max_rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Singular values ``σ`` and right singular vectors ``W`` (d, k) of the rows of ``vectors``, keeping the
    directions with ``σ_i > rtol · σ₁`` (at most ``max_rank``, largest first).

    Computed from the eigendecomposition of the smaller Gram matrix (``T Tᵀ`` or ``Tᵀ T``, float64) followed by one
    QR pass, which restores the orthonormality that squaring the condition number costs (to ~1e-15). This is an
    order of magnitude cheaper than a full SVD for the thin matrices met here.
    """
    rows = _as_rows(vectors)
    if rtol < 0:
        raise ValueError(f"`rtol` must be >= 0, got {rtol}.")
    count, dim = rows.shape
    empty = rows.new_zeros(0), rows.new_zeros(dim, 0)
    if count == 0:
        return empty
    gram = rows @ rows.T if count <= dim else rows.T @ rows
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    singular_values = eigenvalues.flip(0).clamp(min=0).sqrt()
    eigenvectors = eigenvectors.flip(1)
    if singular_values[0] == 0:
        return empty
    keep = int((singular_values > rtol * singular_values[0]).sum())
    if max_rank is not None:
        keep = min(keep, int(max_rank))
    singular_values = singular_values[:keep]
    directions = rows.T @ eigenvectors[:, :keep] / singular_values if count <= dim else eigenvectors[:, :keep]
    q, r = torch.linalg.qr(directions)
    return singular_values, q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def orthonormal_basis(vectors: Tensor, rtol: float = DEFAULT_RANK_TOLERANCE, max_rank: int | None = None) -> Tensor:
    """Orthonormal basis ``Q`` (d, k) of the span of the rows of ``vectors`` (n, d), by SVD.

    ``vectors = U Σ Wᵀ``; the kept columns of ``W`` are those whose singular value exceeds ``rtol · σ₁``
    (at most ``max_rank`` of them, largest first). ``QᵀQ = I_k`` and every row ``t`` satisfies
    ``‖t − QQᵀt‖ ≤ σ_{k+1}``, i.e. the dropped directions carry at most ``rtol`` of the largest singular value.
    Returns a contiguous float64 tensor; ``k`` may be 0 when every vector is zero.
    """
    _, directions = _principal_directions(vectors, rtol, max_rank)
    # contiguous: SVD/QR results are column-major views, and a basis reloaded from disk is row-major;
    # matmuls over different layouts round differently in the last ulp.
    return directions.contiguous()


def gram_factor(vectors: Tensor, rtol: float = DEFAULT_RANK_TOLERANCE) -> Tensor:
    """A thin factor ``F`` (d, k) with ``F Fᵀ = Tᵀ T`` for the rows ``T`` of ``vectors`` (dropping directions whose
    singular value is below ``rtol · σ₁``). CCUP depends on its forget and retain sets only through these Gram
    matrices, so ``F`` is all an adapter must store: ``k ≤ min(n, d)`` columns instead of ``n``.
    """
    singular_values, directions = _principal_directions(vectors, rtol)
    return (directions * singular_values).contiguous()


def remove_span(vectors: Tensor, basis: Tensor) -> Tensor:
    """Rows of ``vectors`` with their component in ``span(basis)`` removed: ``t − QQᵀt`` (``basis`` orthonormal)."""
    rows = _as_rows(vectors)
    q = basis.to(torch.float64)
    return rows - (rows @ q) @ q.T


def shared_direction(vectors: Tensor) -> Tensor:
    """The direction all classes share: ``s = mean(t̂_i) / ‖mean(t̂_i)‖`` over the normalised rows ``t̂_i``.

    Text embeddings of class prompts have a large common component ("a photo of a …"). Removing a forget class's
    full embedding also removes part of that component from every image, which lowers *all* other classes'
    cosines; keeping ``s`` out of the forget subspace instead sends the forgotten class's logit to about the mean
    of all classes' logits (its own share of ``s``), below the best class of any image.
    """
    mean = normalize_rows(vectors).mean(dim=0)
    norm = mean.norm()
    if norm < 1e-6:
        raise ValueError("The class embeddings cancel out on average; they have no shared direction to keep.")
    return mean / norm


@dataclass(frozen=True)
class LowRankEdit:
    """The linear map ``M = I − U Vᵀ`` of a d-dimensional embedding space.

    ``left`` is ``U`` and ``right`` is ``V``, both ``(d, r)``. ``apply`` maps each row ``y`` of a feature tensor
    to ``M y`` (computed on rows as ``y − (y V) Uᵀ``), and ``apply_to_weight`` maps a layer weight
    ``W ↦ M W = W − U (Vᵀ W)``, so that the edited layer's outputs are ``M`` times the original ones.
    """

    left: Tensor
    right: Tensor

    def __post_init__(self):
        if self.left.shape != self.right.shape or self.left.ndim != 2:
            raise ValueError(
                f"LowRankEdit factors must both be (d, r); got {tuple(self.left.shape)} and {tuple(self.right.shape)}."
            )

    @property
    def dim(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @classmethod
    def identity(cls, dim: int, dtype: torch.dtype = torch.float64, device=None) -> LowRankEdit:
        empty = torch.zeros(dim, 0, dtype=dtype, device=device)
        return cls(empty, empty.clone())

    def to(self, *args, **kwargs) -> LowRankEdit:
        return LowRankEdit(self.left.to(*args, **kwargs).contiguous(), self.right.to(*args, **kwargs).contiguous())

    def matrix(self) -> Tensor:
        """The dense ``(d, d)`` matrix ``M`` (for tests and inspection)."""
        eye = torch.eye(self.dim, dtype=self.left.dtype, device=self.left.device)
        return eye - self.left @ self.right.T

    def apply(self, features: Tensor) -> Tensor:
        """``M`` applied to every row of ``features`` (..., d), computed in the dtype of the factors."""
        return features - (features @ self.right) @ self.left.T

    def apply_to_weight(self, weight: Tensor) -> Tensor:
        """``M W`` for a ``(d, n_in)`` weight, computed in the dtype of the factors."""
        return weight - self.left @ (self.right.T @ weight)

    def transposed(self) -> LowRankEdit:
        """``Mᵀ = I − V Uᵀ``.

        The methods define ``M`` on *text* directions (``M T_f ≈ 0``, ``M T_r ≈ T_r``). Applied to image embeddings
        ``v`` a logit is ``(M' v)·t = v·(M'ᵀ t)``, so the image-side edit that gives every image the logits of the
        edited text directions is ``M' = Mᵀ``. Projectors (nullspace) are symmetric; CCUP's ``M`` is not.
        """
        return LowRankEdit(self.right, self.left)

    def then(self, outer: LowRankEdit) -> LowRankEdit:
        """The composition ``outer ∘ self``, i.e. ``M_outer M_self``, again in low-rank form:
        ``(I − U₂V₂ᵀ)(I − U₁V₁ᵀ) = I − [U₂, U₁ − U₂(V₂ᵀU₁)] [V₂, V₁]ᵀ``."""
        if self.rank == 0:
            return outer
        if outer.rank == 0:
            return self
        left = torch.cat([outer.left, self.left - outer.left @ (outer.right.T @ self.left)], dim=1)
        return LowRankEdit(left.contiguous(), torch.cat([outer.right, self.right], dim=1).contiguous())


def nullspace_edit(basis: Tensor, alpha: float = 1.0) -> LowRankEdit:
    """The partial nullspace projector ``P_α = I − α QQᵀ`` for an orthonormal ``basis`` ``Q`` (d, k).

    For ``t`` in ``span(Q)``: ``tᵀ P_α y = (1 − α) tᵀ y`` for every ``y`` — at ``α = 1`` every edited embedding is
    orthogonal to the forget subspace; directions orthogonal to ``Q`` are left exactly as they were.
    """
    check_alpha(alpha)
    q = basis.to(torch.float64)
    return LowRankEdit((alpha * q).contiguous(), q.contiguous())


def ccup_edit(forget_factor: Tensor, retain_factor: Tensor | None, ccup_lambda: float, ccup_mu: float) -> LowRankEdit:
    """CCUP, the consistent class-unlearning projection, in closed form.

    Solves ``min_M ‖M − I‖²_F + λ ‖M T_f‖²_F + μ ‖M T_r − T_r‖²_F`` where ``T_f T_fᵀ = F Fᵀ`` (``forget_factor``) and
    ``T_r T_rᵀ = R Rᵀ`` (``retain_factor``). Setting the gradient to zero gives
    ``M = (I + μ R Rᵀ) A⁻¹ = I − λ F Fᵀ A⁻¹`` with ``A = I + λ F Fᵀ + μ R Rᵀ`` (symmetric positive definite), i.e.
    the rank-k edit ``U = F``, ``V = λ A⁻¹ F``. Since ``M`` minimises the objective, comparing with ``M = I`` gives
    ``μ ‖M T_r − T_r‖² ≤ λ ‖T_f‖²``: retain directions move by at most ``√(λ/μ) ‖T_f‖_F``.
    """
    check_nonnegative(ccup_lambda, "ccup_lambda")
    check_nonnegative(ccup_mu, "ccup_mu")
    f = forget_factor.to(torch.float64)
    weighted_forget = [(ccup_lambda**0.5) * f]
    weighted_retain = [] if retain_factor is None else [(ccup_mu**0.5) * retain_factor.to(torch.float64)]
    return _joint_ccup(weighted_forget, weighted_retain, f.shape[0], f.device)


def _joint_ccup(weighted_forget: list[Tensor], weighted_retain: list[Tensor], dim: int, device) -> LowRankEdit:
    """CCUP with ``√λ``-scaled forget factors and ``√μ``-scaled retain factors already applied."""
    forget = torch.cat(weighted_forget, dim=1) if weighted_forget else torch.zeros(dim, 0, dtype=torch.float64)
    if forget.shape[1] == 0:
        return LowRankEdit.identity(dim, device=device)
    gram = torch.eye(dim, dtype=torch.float64, device=device) + forget @ forget.T
    for retain in weighted_retain:
        gram = gram + retain @ retain.T
    right = torch.linalg.solve(gram, forget)  # A symmetric: (Fᵀ A⁻¹)ᵀ = A⁻¹ F
    return LowRankEdit(forget.contiguous(), right.contiguous())


@dataclass(frozen=True)
class EditSpec:
    """One adapter's contribution to the edit of one layer, as stored by the adapter.

    Attributes:
        name: the adapter name (used only to order the stack deterministically).
        method: ``"nullspace"`` (``forget`` is an orthonormal basis), ``"ccup"`` (``forget``/``retain`` are Gram
            factors, see :func:`gram_factor`) or ``"logit"`` (``forget`` holds the forgotten classes' dual vectors
            ``w_k`` and ``retain`` their detectors ``b_k``, :mod:`.logit_edit`: the edit of class directions is
            ``I − [b_k][w_k]ᵀ``, the strengths are in the factors).
        forget: ``(d, k)`` forget factor.
        retain: ``(d, r)`` retain factor, or ``None`` (CCUP only; ``"logit"``: ``(d, k)``, required).
        alpha: strength of a nullspace edit in ``[0, 1]``.
        ccup_lambda, ccup_mu: CCUP weights of the forget and retain terms.
    """

    name: str
    method: EditMethod
    forget: Tensor
    retain: Tensor | None = None
    alpha: float = 1.0
    ccup_lambda: float = 1.0
    ccup_mu: float = 0.0

    def __post_init__(self):
        for role, factor in (("forget", self.forget), ("retain", self.retain)):
            if factor is None:
                continue
            if not torch.isfinite(factor).all():
                raise ValueError(
                    f"The {role} factor of adapter {self.name!r} contains NaN or inf values: the adapter is broken "
                    "(corrupted file or a failed build). Delete it and build or load it again."
                )
            if factor.shape[1] and (factor.abs().amax(dim=0) == 0).any():
                raise ValueError(
                    f"The {role} factor of adapter {self.name!r} has an all-zero column: its edit was never "
                    "computed (it was created from a config without building it, or its weights were never loaded). "
                    "Build forget adapters with `hf_clip_forget.add_forget_adapter` (or from a config that names "
                    "its `forgotten_classes`), and load saved ones with `ForgetPeftModel.from_pretrained`."
                )


def compose_edits(specs: Sequence[EditSpec], dim: int, rtol: float = DEFAULT_RANK_TOLERANCE) -> LowRankEdit:
    """The edit of a stack of adapters: the **union** of their forget subspaces, never a product of projectors
    nor a sum of deltas.

    * Nullspace adapters: bases are re-orthonormalised in float64 and taken in order of decreasing ``α`` (then
      name); each is Gram–Schmidt-orthogonalised against the directions already claimed, so the blocks are mutually
      orthogonal and ``P = I − Σ α_i Q_i' Q_i'ᵀ``. With every ``α = 1`` this is exactly the projector onto the
      orthogonal complement of ``span(Q_1, …, Q_n)``; a direction shared by several adapters is removed with the
      largest ``α`` among them. The result does not depend on the order in which adapters were added.
    * CCUP adapters: one joint CCUP solve over all their forget and retain terms,
      ``M = I − F̃ F̃ᵀ A⁻¹`` with ``F̃ = [√λ_i F_i]``, ``A = I + F̃F̃ᵀ + Σ μ_i R_i R_iᵀ``.
    * Logit-constrained adapters (:mod:`.logit_edit`): their rank-1 terms add, ``M_logit = I − Σ_k b_k w_kᵀ`` (on
      class directions: each forgotten class's direction loses its detector; with one classifier, each class's logit
      falls by its own term only).
    * Several kinds in one stack: ``M = P_nullspace · M_ccup · M_logit`` — the logit terms act first on the class
      directions, the hard nullspace constraints last, so nothing of a nullspace adapter's subspace survives.
    """
    nullspace_specs = sorted((s for s in specs if s.method == "nullspace"), key=lambda s: (-s.alpha, s.name))
    ccup_specs = sorted((s for s in specs if s.method == "ccup"), key=lambda s: s.name)
    logit_specs = sorted((s for s in specs if s.method == "logit"), key=lambda s: s.name)
    unknown = [s.method for s in specs if s.method not in EDIT_METHODS]
    if unknown:
        raise ValueError(f"Unknown edit method(s) {unknown}; expected one of {EDIT_METHODS}.")

    device = specs[0].forget.device if specs else None
    claimed = torch.zeros(dim, 0, dtype=torch.float64, device=device)
    lefts, rights = [], []
    for spec in nullspace_specs:
        basis = spec.forget.to(torch.float64)
        if basis.shape[1] == 0:
            continue
        basis = orthonormal_basis(basis.T, rtol=rtol)
        # The residual of an orthonormal basis against the claimed span has singular values in [0, 1]: an absolute
        # threshold separates shared directions (residual ~1e-7, float32 noise) from new ones.
        residual = basis - claimed @ (claimed.T @ basis)
        new = _absolute_basis(residual, rtol)
        if new.shape[1] == 0:
            continue
        claimed = torch.cat([claimed, new], dim=1)
        lefts.append(spec.alpha * new)
        rights.append(new)
    projector = (
        LowRankEdit(torch.cat(lefts, dim=1).contiguous(), torch.cat(rights, dim=1).contiguous())
        if lefts
        else LowRankEdit.identity(dim, device=device)
    )

    weighted_forget = [(s.ccup_lambda**0.5) * s.forget.to(torch.float64) for s in ccup_specs]
    weighted_retain = [
        (s.ccup_mu**0.5) * s.retain.to(torch.float64) for s in ccup_specs if s.retain is not None and s.ccup_mu > 0
    ]
    edit = _logit_terms(logit_specs, dim, device).then(_joint_ccup(weighted_forget, weighted_retain, dim, device))
    edit = edit.then(projector)
    if not (torch.isfinite(edit.left).all() and torch.isfinite(edit.right).all()):
        raise ValueError(
            f"The combined edit of {[s.name for s in specs]} is not finite (CCUP weights too large for the factors?)."
        )
    return edit


def _logit_terms(specs: Sequence[EditSpec], dim: int, device) -> LowRankEdit:
    """``I − Σ_k b_k w_kᵀ`` over every logit-constrained adapter (left: the detectors, right: the dual vectors)."""
    if not specs:
        return LowRankEdit.identity(dim, device=device)
    missing = [s.name for s in specs if s.retain is None or s.retain.shape != s.forget.shape]
    if missing:
        raise ValueError(
            f"Logit-constrained adapter(s) {missing} lack their detector factor (one per dual vector): the adapter "
            "is broken. Delete it and build or load it again."
        )
    detectors = torch.cat([s.retain.to(torch.float64) for s in specs], dim=1)
    duals = torch.cat([s.forget.to(torch.float64) for s in specs], dim=1)
    return LowRankEdit(detectors.contiguous(), duals.contiguous())


def _absolute_basis(columns: Tensor, tol: float) -> Tensor:
    """Orthonormal basis of the span of ``columns`` (d, k), dropping directions whose singular value is ``<= tol``."""
    if columns.shape[1] == 0:
        return columns
    singular_values, directions = _principal_directions(columns.T, rtol=0.0)
    return directions[:, singular_values > tol].contiguous()


def check_alpha(alpha: float) -> None:
    """Raise a ``ValueError`` unless ``alpha`` is a number in [0, 1]."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1] (1 = forget completely, 0 = no edit), got {alpha!r}.")


def check_nonnegative(value: float, name: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number >= 0 (the CCUP weights)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
