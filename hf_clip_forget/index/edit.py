"""The edit a model's forget adapters make to stored embeddings, without the model.

A forget adapter edits the layer whose output *is* a joint embedding (``hf_clip_forget.families``), so every
embedding the edited model produces is ``M`` times the one the unedited model produced from the same input, where
``M = I − U Vᵀ`` is the union of the active adapters as that layer applies it. An index of stored embeddings can
therefore be edited exactly, for the cost of reading it once, instead of re-encoding every image:
``e ↦ e − (e V) Uᵀ`` (a low-rank update, never a dense ``d × d`` product), renormalised when the stored vectors
were unit length (``M e / ‖M e‖`` is what the edited model's normalised embedding is).

:class:`EmbeddingEdit` holds that map (float32 factors, exactly those the layer applies), what it was made from
(adapters, their forgotten classes, factor checksums, the base model's fingerprint) and nothing else: it pickles
small, so the same per-shard function runs in one process or on a distributed engine's workers.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..api.adding import holds_forget_adapters
from ..families import find_family
from ..tuners.projection_edit.build import base_fingerprints
from ..tuners.projection_edit.integrity import factor_checksums
from ..tuners.projection_edit.layer import ProjectionEditLayer


#: The sides an index holds: ``"image"`` (or ``"audio"`` for CLAP: the side compared with text) and ``"text"``.
SIDES = ("image", "audio", "text")


class UneditedSideWarning(UserWarning):
    """The active forget adapters do not edit the side asked for: its embeddings are returned unchanged."""


@dataclass(frozen=True)
class EmbeddingEdit:
    """``e ↦ M e`` with ``M = I − U Vᵀ``: what a model's active forget adapters do to one side's embeddings.

    Guarantee: for any input ``x``, ``apply(unedited_model_embedding(x))`` equals the edited model's embedding of
    ``x`` — the same float32 factors the forget layer applies, so up to float32 rounding (cosine ≥ 1 − 1e-6, tested
    on real images and on every family). Unit-length rows come back unit length (``M e / ‖M e‖``).

    Attributes:
        side: ``"image"``, ``"audio"`` or ``"text"``.
        dim: the embedding dimension ``d``.
        left: ``U``, ``(d, r)`` float32 (``r = 0``: the adapters do not edit this side, ``M = I``).
        right: ``V``, ``(d, r)`` float32.
        adapters: the adapters whose union ``M`` is, in the order the layer composes them.
        forgotten: adapter → the classes it forgets (and ``"<class>/<domain>"`` cells for domain edits).
        checksums: adapter → sha256 of each stored factor (``"<module>.forget"``), as its config records them.
        base_fingerprint: sha256 of the base model's fingerprints (every projection's weight and every tower),
            so that an index made by another base model is refused.
        visual_erasure: ``None``, or the record of an index-only projection composed after the adapters'
            edit (:func:`~hf_clip_forget.index.visual.with_visual_erasure`): then ``apply`` gives ``P M e``, not the
            edited model's embedding ``M e``, and every record of the edit says so.
    """

    side: str
    dim: int
    left: Tensor
    right: Tensor
    adapters: tuple[str, ...] = ()
    forgotten: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    checksums: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    base_fingerprint: str = ""
    visual_erasure: Mapping | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"`side` must be one of {SIDES}, got {self.side!r}.")
        if self.left.shape != self.right.shape or self.left.ndim != 2 or self.left.shape[0] != self.dim:
            raise ValueError(f"The factors must both be ({self.dim}, r); got {tuple(self.left.shape)} and "
                             f"{tuple(self.right.shape)}.")  # fmt: skip

    @property
    def rank(self) -> int:
        """``r``: how many directions ``M`` changes (0: the identity)."""
        return int(self.left.shape[1])

    @property
    def is_identity(self) -> bool:
        return self.rank == 0

    def matrix(self) -> Tensor:
        """The dense ``(d, d)`` float64 ``M`` (for tests and inspection; :meth:`apply` never forms it)."""
        return torch.eye(self.dim, dtype=torch.float64) - self.left.double() @ self.right.double().T

    def apply(self, embeddings, normalized: bool | None = None, out=None):
        """``M e`` for every row ``e`` of ``embeddings`` (``(n, d)``, a ``torch.Tensor`` or a ``numpy`` array), in
        the input's type, dtype and device.

        Args:
            embeddings: stored embeddings, raw or L2-normalised; float16, bfloat16, float32 or float64.
            normalized: whether the rows are unit length, so that the edited rows are renormalised. ``None``
                (default): decided from the rows (:func:`unit_rows`); a mix of unit and other rows is refused.
            out: where to write the edited rows (same type, shape and dtype as ``embeddings``; it may not overlap
                them), so that a caller editing shard after shard reuses one buffer; default: a new one.

        Computed in float32 (float64 for float64 input) as ``e − (e V) Uᵀ``: ``O(n d r)``, never ``O(n d²)``, in
        blocks of :func:`block_rows` rows, each converted into one reused buffer, edited in place there and
        converted back (so the cost is close to reading and writing the rows once). A row the edit maps to zero (it
        lay in the forgotten span) stays zero rather than being renormalised.
        """
        return self.apply_reporting(embeddings, normalized, out)[0]

    def apply_reporting(self, embeddings, normalized: bool | None = None, out=None) -> tuple:
        """:meth:`apply`, returning ``(edited, normalized)``: also whether the rows were taken as unit length (what
        ``normalized=None`` decided), for a record of what was done."""
        rows, target = _as_tensor(embeddings), None if out is None else _as_tensor(out)
        self._check_rows(rows)
        if target is not None and (target.shape != rows.shape or target.dtype != rows.dtype):
            raise ValueError(f"`out` must have the embeddings' shape {tuple(rows.shape)} and dtype {rows.dtype}, "
                             f"got {tuple(target.shape)} and {target.dtype}.")  # fmt: skip
        if self.is_identity or rows.shape[0] == 0:
            unit = unit_rows(rows) if normalized is None else normalized  # a mix refused, as below
            if target is None:
                return embeddings, unit
            target.copy_(rows)
            return out, unit
        edited = torch.empty_like(rows) if target is None else target
        decided = _UnitDecision(normalized)
        _BlockEditor(self, rows).run(rows, edited, decided)
        if out is not None:
            return out, bool(decided.value)
        return (edited.numpy() if isinstance(embeddings, np.ndarray) else edited), bool(decided.value)

    def _check_rows(self, rows: Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"The {self.side} embeddings must be (n, {self.dim}) — this edit is for {self.dim}-dimensional "
                f"embeddings — got shape {tuple(rows.shape)}. Check that the vectors were made by the adapter's base "
                "model and that `side` names the side they embed."
            )
        if not rows.is_floating_point():
            raise TypeError(f"Embeddings must be floating point (float16, bfloat16, float32, float64), got "
                            f"{rows.dtype}.")  # fmt: skip

    def to_dict(self) -> dict:
        """The record a provenance file keeps (everything but the factors, which ``checksums`` identify)."""
        return {
            "side": self.side,
            "dim": self.dim,
            "rank": self.rank,
            "adapters": list(self.adapters),
            "forgotten": {name: list(classes) for name, classes in self.forgotten.items()},
            "factor_checksums": {name: dict(sums) for name, sums in self.checksums.items()},
            "base_model_fingerprint": self.base_fingerprint,
            "visual_erasure": None if self.visual_erasure is None else dict(self.visual_erasure),
        }


#: Bytes of float32 per block of :meth:`EmbeddingEdit.apply`: a block and its result stay in the CPU's cache. With the
#: block buffers reused (:class:`_BlockEditor`) the size matters little (512-dimensional float16 rows, one thread:
#: 0.066–0.069 s per 100 MB for 256 KiB to 8 MiB blocks); without reuse, 1 MiB was 3× faster than 4 MiB.
BLOCK_BYTES = 1 << 20


def block_rows(dim: int) -> int:
    """Rows per block of :meth:`EmbeddingEdit.apply` for ``dim``-dimensional rows (:data:`BLOCK_BYTES`)."""
    return max(1, BLOCK_BYTES // (4 * dim))


class _BlockEditor:
    """Edits rows block by block through one reused compute-dtype buffer: convert a block in, decide or check that
    it is unit length, ``block −= (block V) Uᵀ`` in place, renormalise, convert out. Reusing the buffers (instead
    of new tensors per block) halves the edit's time: it is bound by memory traffic, not arithmetic."""

    def __init__(self, edit: EmbeddingEdit, rows: Tensor) -> None:
        compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
        self.left_t = edit.left.to(rows.device, compute).T
        self.right = edit.right.to(rows.device, compute)
        self.step = min(block_rows(edit.dim), rows.shape[0])
        self.block = torch.empty(self.step, edit.dim, dtype=compute, device=rows.device)
        self.coefficients = torch.empty(self.step, edit.rank, dtype=compute, device=rows.device)

    def run(self, rows: Tensor, edited: Tensor, decided: _UnitDecision) -> None:
        for start in range(0, rows.shape[0], self.step):
            count = min(self.step, rows.shape[0] - start)
            block, coefficients = self.block[:count], self.coefficients[:count]
            block.copy_(rows[start : start + count])
            unit = decided.check(block, rows.dtype)
            torch.mm(block, self.right, out=coefficients)
            block.addmm_(coefficients, self.left_t, alpha=-1)
            if unit:  # scale each row by 1/‖row‖ (a zero row by 1: it stays zero)
                norms = torch.linalg.vector_norm(block, dim=-1)
                block.mul_(torch.where(norms > 0, norms.reciprocal(), torch.ones_like(norms)).unsqueeze_(-1))
            edited[start : start + count].copy_(block)


def _as_tensor(values) -> Tensor:
    """A tensor sharing ``values``' memory (a ``numpy`` array — read-only ones too, as a memory map or bytes read
    are: they are only read, or written where the caller asked — or a tensor as it is)."""
    if not isinstance(values, np.ndarray):
        return values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def unit_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of a stored unit-length row may be: its dtype's rounding (float16: relative 2⁻¹¹ per
    entry, so the norm is 1 within ~1e-3) plus the producer's float32 arithmetic, ``4 × max(eps(dtype), 2.5e-4)``."""
    return 4 * max(torch.finfo(dtype).eps, 2.5e-4)


def _unit_mask(norms: Tensor, dtype: torch.dtype) -> Tensor:
    """For each row norm: whether the row is unit length within its dtype's rounding (:func:`unit_tolerance`)."""
    return (norms - 1).abs() <= unit_tolerance(dtype)


def _mixed_error(unit: int | None = None, total: int | None = None) -> ValueError:
    counted = f"{unit} of {total} rows are" if unit is not None else "Some rows are"
    return ValueError(
        f"{counted} unit length and the others are not, so whether to renormalise the edited rows cannot be "
        "decided. Pass normalized=True (the vectors are meant to be L2-normalised) or normalized=False."
    )


class _UnitDecision:
    """Whether the rows are unit length, decided on the first block (unless given) and checked on every later one,
    so that a mix is refused without a pass of its own over the rows."""

    def __init__(self, normalized: bool | None) -> None:
        self.given, self.value = normalized is not None, normalized

    def check(self, block: Tensor, dtype: torch.dtype) -> bool:
        if self.given:
            return bool(self.value)
        norms = torch.linalg.vector_norm(block, dim=-1)
        norms = norms[norms > 0]  # zero rows stay zero either way
        if norms.numel() == 0:
            return bool(self.value)
        mask = _unit_mask(norms, dtype)
        unit = bool(mask.all())
        if (not unit and bool(mask.any())) or (self.value is not None and unit != self.value):
            raise _mixed_error()
        self.value = unit
        return unit


def unit_rows(rows: Tensor) -> bool:
    """Whether the (non-zero) rows of ``rows`` are L2-normalised, within their dtype's rounding
    (:func:`unit_tolerance`). Refuses a mix of unit-length and other rows (a corrupt or concatenated index), since
    either choice would be wrong for some rows."""
    norms = torch.linalg.vector_norm(rows.to(torch.float64), dim=-1)
    norms = norms[norms > 0]
    if norms.numel() == 0:
        return False
    mask = _unit_mask(norms, rows.dtype)
    if bool(mask.all()):
        return True
    if bool(mask.any()):
        raise _mixed_error(int(mask.sum()), int(mask.numel()))
    return False


def embedding_edit(model: nn.Module, side: str = "image") -> EmbeddingEdit:
    """The :class:`EmbeddingEdit` that ``model``'s forget adapters, as they stand (active, merged, disabled), make
    to its ``side`` embeddings.

    Args:
        model: a model holding forget adapters (a ``ForgetPeftModel`` or a peft ``PeftModel`` of forget adapters).
        side: ``"image"`` (``"audio"`` for CLAP) or ``"text"``.

    Warns :class:`UneditedSideWarning` (and returns the identity) when no active adapter edits that side.
    """
    base, family = _edited_base(model)
    side = _check_side(side, family)
    layer_name, layer = _side_layer(base, family, side)
    names = layer.applied_adapters() if layer is not None else []
    if not names:
        warnings.warn(
            f"No active forget adapter of this model edits its {side} side (adapters edit "
            f"{_edited_sides(base, family)}), so its {side} embeddings are unchanged: the vectors are returned as "
            "they are. Edit the other side's index, or add an adapter with the target that edits this side.",
            UneditedSideWarning,
            stacklevel=2,
        )
        dim = _side_dim(base, family, side)
        empty = torch.zeros(dim, 0)
        return EmbeddingEdit(side, dim, empty, empty.clone(), base_fingerprint=model_fingerprint(base))
    edit = layer.combined_edit(names, device=torch.device("cpu"))
    configs = model.peft_config
    layers = {layer_name: layer}
    return EmbeddingEdit(
        side=side,
        dim=edit.dim,
        left=edit.left.detach().clone(),
        right=edit.right.detach().clone(),
        adapters=tuple(names),
        forgotten={name: tuple(_forgotten(configs[name])) for name in names},
        checksums={name: factor_checksums(layers, name) for name in names},
        base_fingerprint=model_fingerprint(base),
    )


def edit_embeddings(model: nn.Module, embeddings, side: str = "image", normalized: bool | None = None):
    """The embeddings ``model`` (with its active forget adapters) would produce from the inputs that the *unedited*
    base model embedded as ``embeddings``: :meth:`EmbeddingEdit.apply` of :func:`embedding_edit`.

    ``embeddings``: ``(n, d)`` tensor or numpy array, raw or L2-normalised (normalised in → normalised out), any
    float dtype (returned in the same dtype). Example::

        model = clip.add_forget_adapter(["dog"], tokenizer=tokenizer)
        stored = np.load("img_emb/img_emb_0.npy")              # made by the unedited CLIP
        edited = edit_embeddings(model, stored, side="image")  # == the edited CLIP's embeddings of those images
    """
    return embedding_edit(model, side).apply(embeddings, normalized=normalized)


def load_embedding_edit(base_model: nn.Module, adapter, side: str = "image", **load_options) -> EmbeddingEdit:
    """The :class:`EmbeddingEdit` of a saved adapter (or stack) ``adapter`` — a directory or a Hub repo id — on
    ``base_model``: loaded with every check of ``ForgetPeftModel.from_pretrained`` (checksums, base fingerprints,
    finite factors), read off, and unloaded again, so ``base_model`` is left as it was. ``load_options`` go to
    ``from_pretrained`` (``revision``, ``token``, ``subfolder``...)."""
    from ..api import ForgetPeftModel  # the user API: imported here, where a saved adapter is loaded

    model = ForgetPeftModel.from_pretrained(base_model, str(adapter), **load_options)
    try:
        return embedding_edit(model, side)
    finally:
        model.unload()


def model_fingerprint(base: nn.Module) -> str:
    """sha256 of the base model's fingerprints (``base_fingerprints``: each projection's unedited weight and a sample
    of every tower), so that two loads of the same checkpoint, in any float dtype cast, give the same id only when
    their hashes agree exactly; the dtype-robust comparison is :func:`same_base_model`."""
    record = json.dumps(base_fingerprints(base), sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()


# -------------------------------------------------------------------------------------------------------- helpers
def _edited_base(model: nn.Module):
    if not holds_forget_adapters(model):
        raise TypeError(
            f"{type(model).__name__} holds no forget adapters: pass the model returned by `add_forget_adapter`, or "
            "one loaded with `ForgetPeftModel.from_pretrained(base, adapter_dir)` (or `load_embedding_edit`)."
        )
    base = model.get_base_model()
    family = find_family(base)
    if family is None:  # holds_forget_adapters implies a supported family; kept as a clear error
        raise TypeError(f"{type(base).__name__} is not a supported dual encoder.")
    return base, family


def _check_side(side: str, family) -> str:
    non_text = "audio" if family.inputs == "audio" else "image"
    if side not in SIDES:
        raise ValueError(f"`side` must be {non_text!r} or 'text', got {side!r}.")
    if side != "text" and side != non_text:
        raise ValueError(f"{family.name}'s embeddings compared with text are {non_text} embeddings: pass "
                         f"side={non_text!r} (or 'text'), not {side!r}.")  # fmt: skip
    return side


def _side_layer(base: nn.Module, family, side: str) -> tuple[str, ProjectionEditLayer | None]:
    for name, module in base.named_modules():
        if isinstance(module, ProjectionEditLayer) and family.is_text_side(name) == (side == "text"):
            return name, module
    return "", None


def _side_dim(base: nn.Module, family, side: str) -> int:
    module = base.get_submodule(family.side("text" if side == "text" else "visual").module)
    if isinstance(module, ProjectionEditLayer):
        return int(module.out_features)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    projection_dim = getattr(base.config, "projection_dim", None)
    if projection_dim is None:
        raise ValueError(f"The {side} embedding dimension of {type(base).__name__} is not declared.")
    return int(projection_dim)


def _edited_sides(base: nn.Module, family) -> str:
    sides = {"text" if family.is_text_side(name) else "the non-text side"
             for name, module in base.named_modules() if isinstance(module, ProjectionEditLayer)}  # fmt: skip
    return " and ".join(sorted(sides)) or "nothing"


def _forgotten(config) -> list[str]:
    """The classes an adapter forgets, as ``"<class>/<domain>"`` cells when it forgets them in some domains only."""
    classes = list(config.forgotten_classes)
    if config.paradigm == "domain" and config.domains:
        return [f"{name}/{domain}" for name in classes for domain in config.domains]
    return classes
