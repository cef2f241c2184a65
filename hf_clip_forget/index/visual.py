"""Erase what a forgotten class *looks like* from a stored index, so that image→image search forgets it too.

A forget adapter is built from class names: it removes the directions the class's *text* spans. A text query for the
class then finds its images no better than chance (with the recommended settings, ``docs/index_forgetting.md``), but
an image query compares images with images along directions no name spans: measured on PACS, an edited query image
of a forgotten class still retrieves its class at 2–5× chance after every name-built edit.

The index holds those directions itself. :func:`visual_erasure` finds them from a sample of the stored vectors,
without labels: each sampled vector is assigned to its nearest class name (cosine with the unedited text embeddings
of the forgotten and the other, *competitor*, class names: zero-shot classification), and for each forgotten class
``c`` it takes

- the text direction ``t_c`` (the class's averaged prompt embedding),
- the mean difference between the vectors assigned to ``c`` and the others (after the adapter's edit),
- the ``rank`` *contrastive* principal directions of the vectors assigned to ``c`` (after the adapter's edit): the
  top eigenvectors of ``Σ_c − Σ``, their covariance minus the whole sample's, i.e. the directions along which the
  class varies more than the index does. Plain principal directions of the class would be the index's own main
  directions of variation (shared by every class): measured on CIFAR-10 they cost the other classes 17–32 points of
  zero-shot accuracy, the contrastive ones 2,

and ``Q``, an orthonormal basis of all of them. :func:`with_visual_erasure` composes the orthogonal projection
``P = I − Q Qᵀ`` after the adapter's edit ``M``: stored vectors become ``P M e``, still a low-rank update
``I − [U, Q] [V, Q − V (Uᵀ Q)]ᵀ``.

**What this is and is not.** ``P M e`` is *not* what re-encoding with the edited model gives (that is ``M e``): it is
an index-only edit, recorded as such in the :class:`~hf_clip_forget.index.edit.EmbeddingEdit` and the provenance
(its basis' checksum, rank, sample and how many vectors were assigned to each class). Queries need no change: ``P``
is a symmetric projector, so for any query ``q``, ``q · P x = (P q) · (P x)``, and the ranking over unit-normalised
stored vectors for a query made by the edited model (``M``) is the ranking ``P``-projected queries would get. It
works on the classes' *looks* as the index shows them, so it needs other class names to tell them apart (the adapter's
``retain_classes``), and it is per class: an adapter forgetting (class, domain) cells is refused (it would erase the
class in every domain).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn.functional import normalize

from .edit import EmbeddingEdit


#: Contrastive principal directions per forgotten class. Chosen on PACS train (every class forgotten in turn, the
#: stored vectors assigned by zero-shot): with 4, every class's image→image precision came within 0.032 of chance
#: (mean 0.015) for 1.6 points of the other classes' zero-shot accuracy; 2 left up to 0.043; none (the text and
#: mean-difference directions alone) left up to 0.119.
DEFAULT_VISUAL_RANK = 4
#: A class needs this many assigned vectors in the sample for its directions to be estimated.
MIN_MEMBERS = 8


@dataclass(frozen=True)
class VisualErasure:
    """``P = I − Q Qᵀ``: the orthonormal ``basis`` ``Q`` ``(d, k)`` (float32) of the forgotten classes' looks, and
    what it was estimated from: the ``classes``, the ``competitors`` they were told apart from, the vectors assigned
    to each class (``members``) out of ``sample`` sampled, and ``rank`` contrastive principal directions per class."""

    basis: Tensor
    classes: tuple[str, ...]
    competitors: tuple[str, ...]
    members: dict[str, int]
    sample: int
    rank: int

    def to_dict(self) -> dict:
        """What a provenance record keeps (the basis by its checksum)."""
        digest = hashlib.sha256(self.basis.float().contiguous().numpy().tobytes()).hexdigest()
        return {"method": "visual erasure (index only)", "classes": list(self.classes),
                "competitors": len(self.competitors), "members": dict(self.members), "sample": self.sample,
                "contrastive_directions_per_class": self.rank, "directions": int(self.basis.shape[1]), "basis_sha256": digest}  # fmt: skip


def visual_erasure(
    sample: Tensor,
    class_text: Tensor,
    competitor_text: Tensor,
    classes: Sequence[str],
    competitors: Sequence[str],
    edit: EmbeddingEdit | None = None,
    rank: int = DEFAULT_VISUAL_RANK,
) -> VisualErasure:
    """Estimate the forgotten classes' visual directions from ``sample``, stored vectors of the unedited model.

    Args:
        sample: ``(n, d)`` stored vectors (raw or unit length).
        class_text: ``(c, d)`` text embeddings of the forgotten ``classes`` (unedited model, averaged prompts).
        competitor_text: ``(m, d)`` text embeddings of the other class names the index holds (``competitors``).
        edit: the adapter's edit ``M``, applied to the sample before its directions are taken (``P`` acts after it).
        rank: contrastive principal directions per class.

    Raises ``ValueError`` when there are no competitors, or a class has fewer than :data:`MIN_MEMBERS` (or all)
    sampled vectors assigned to it (its looks cannot be estimated from this index: sample more, or leave it out).
    """
    classes, competitors = tuple(classes), tuple(competitors)
    _check_inputs(sample, class_text, competitor_text, classes, competitors, rank)
    rows = normalize(sample.double(), dim=-1)
    names = normalize(torch.cat([class_text, competitor_text]).double(), dim=-1)
    nearest = (rows @ names.T).argmax(dim=1)
    edited = rows if edit is None else normalize(edit.apply(rows), dim=-1)
    overall = torch.cov(edited.T)
    directions, members = [], {}
    for index, name in enumerate(classes):
        assigned = nearest == index
        members[name] = int(assigned.sum())
        if not MIN_MEMBERS <= members[name] < len(rows):
            raise ValueError(
                f"{members[name]} of the {len(rows)} sampled vectors are nearest to {name!r} among the class names "
                f"given, so what {name!r} looks like in this index cannot be estimated (at least {MIN_MEMBERS} are "
                "needed, and some of another class). Sample more vectors, or check that the index holds the class."
            )
        inside, outside = edited[assigned], edited[~assigned]
        contrastive = torch.linalg.eigh(torch.cov(inside.T) - overall).eigenvectors[:, edited.shape[1] - rank :]
        directions += [names[index : index + 1], (inside.mean(dim=0) - outside.mean(dim=0))[None], contrastive.T]
    return VisualErasure(_orthonormal(torch.cat(directions).T).float(), classes, competitors, members, len(rows), rank)


def with_visual_erasure(edit: EmbeddingEdit, erasure: VisualErasure) -> EmbeddingEdit:
    """The edit ``P M``: ``edit`` then the projection away from ``erasure``'s basis, as one low-rank edit
    (``left = [U, Q]``, ``right = [V, Q − V (Uᵀ Q)]``), recorded in the result's ``visual_erasure``."""
    if erasure.basis.shape[0] != edit.dim:
        raise ValueError(f"The visual erasure is {erasure.basis.shape[0]}-dimensional, the edit {edit.dim}.")
    if edit.side == "text":
        raise ValueError("Visual erasure is for an index of images (side 'image' or 'audio'), not of texts.")
    left, right, basis = edit.left.double(), edit.right.double(), erasure.basis.double()
    right_of_basis = basis - right @ (left.T @ basis)
    return replace(edit, left=torch.cat([left, basis], dim=1).float().contiguous(),
                   right=torch.cat([right, right_of_basis], dim=1).float().contiguous(),
                   visual_erasure=erasure.to_dict())  # fmt: skip


def _orthonormal(directions: Tensor) -> Tensor:
    """An orthonormal basis of the span of the columns (numerically dependent ones dropped)."""
    basis, strengths, _ = torch.linalg.svd(directions, full_matrices=False)
    return basis[:, strengths > strengths.max() * 1e-8]


def _check_inputs(sample, class_text, competitor_text, classes, competitors, rank) -> None:
    if not competitors:
        raise ValueError(
            "Visual erasure tells the forgotten classes' vectors apart from the others by their nearest class name, "
            "so it needs the index's other class names: build the adapter with retain_classes (or pass competitors)."
        )
    if rank < 0:
        raise ValueError(f"rank must be at least 0, got {rank}.")
    if not bool(torch.isfinite(sample).all()):
        raise ValueError(
            "The sampled stored vectors hold NaN or infinite values, so what the classes look like cannot be "
            "estimated from them: repair or drop those vectors (the index is corrupt there), or leave the visual "
            "erasure out."
        )
    dims = {sample.shape[-1], class_text.shape[-1], competitor_text.shape[-1]}
    if len(dims) != 1 or len(class_text) != len(classes) or len(competitor_text) != len(competitors):
        raise ValueError(
            f"The sample {tuple(sample.shape)}, class texts {tuple(class_text.shape)} ({len(classes)} classes) and "
            f"competitor texts {tuple(competitor_text.shape)} ({len(competitors)} names) do not fit together."
        )
