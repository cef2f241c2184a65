"""What a forget layer's cached edit and merged weight were computed from, so that any change of a factor (a
``load_state_dict``, an in-place copy, a replaced tensor) or of the weight is noticed at the next forward."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...core.subspace import LowRankEdit


def tensor_token(tensor: torch.Tensor | None) -> tuple | None:
    """What identifies the *contents* of ``tensor`` for the edit cache, or ``None`` when they cannot be tracked.

    Every in-place change (``copy_`` by ``load_state_dict``, ``set_peft_model_state_dict``, ``load_adapter``)
    bumps ``_version``; a replaced storage (``.data = ...``, ``assign=True``) changes ``data_ptr``. Inference tensors
    have no version counter, so they are never cached.
    """
    if tensor is None:
        return ()
    if tensor.is_inference():
        return None
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device)


class FactorState(NamedTuple):
    """The factor tensors and settings a combined edit was computed from.

    ``tensors`` holds references, compared by identity: keeping them alive means no other tensor can take their
    place (and their ``id``/``data_ptr``) while this state is kept."""

    tensors: tuple
    tokens: tuple | None  # None: some factor is an inference tensor, whose changes cannot be tracked

    def same_as(self, other: FactorState) -> bool:
        return (
            self.tokens is not None
            and self.tokens == other.tokens
            and len(self.tensors) == len(other.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors, strict=True))
        )


class CachedEdit(NamedTuple):
    state: FactorState
    edit: LowRankEdit


class MergeRecord(NamedTuple):
    """What the merged weight was computed from, and the weight as written."""

    names: tuple[str, ...]
    factors: FactorState
    weight: torch.Tensor
    weight_token: tuple | None
