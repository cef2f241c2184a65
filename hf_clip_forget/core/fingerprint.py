"""Fingerprints of projection weights: does an adapter meet the base model it was built for?

A forget edit is computed from one model's text tower and projections; applied to another model it removes the
wrong directions, silently. An adapter therefore records a fingerprint of the base projection weights, and
loading compares it with the model at hand.

The fingerprint has two parts:

* ``sha256`` of the weight in float32 — exact identity, and a short id to print;
* ``sketch = aᵀ W B / ‖W‖_F``: 8 × 8 numbers, with ``a``/``B`` fixed seeded Gaussian matrices. Casting the same model
  to bfloat16 or float16 moves the sketch by ~1e-3 relative, while a different model gives an unrelated sketch
  (relative distance ~1), so two weights *match* when their hashes are equal or their sketches agree within
  :data:`SKETCH_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


SKETCH_SIZE = 8
SKETCH_SEED = 20251216
#: Relative distance under which two sketches count as the same weights (bf16 casts move them ~1e-3).
SKETCH_TOLERANCE = 1e-2


@dataclass(frozen=True)
class WeightFingerprint:
    """Identity of one weight matrix: its shape, the sha256 of its float32 bytes and a dtype-robust sketch."""

    shape: tuple[int, ...]
    sha256: str
    sketch: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "sha256": self.sha256, "sketch": list(self.sketch)}

    @classmethod
    def from_dict(cls, data: dict) -> WeightFingerprint:
        return cls(tuple(data["shape"]), str(data["sha256"]), tuple(float(x) for x in data["sketch"]))

    @property
    def short(self) -> str:
        """The first 12 hex digits of the hash, for display."""
        return self.sha256[:12]

    def matches(self, other: WeightFingerprint) -> bool:
        """Same weights, up to a cast between float32, float16 and bfloat16."""
        if self.shape != other.shape:
            return False
        if self.sha256 == other.sha256:
            return True
        mine, theirs = torch.tensor(self.sketch, dtype=torch.float64), torch.tensor(other.sketch, dtype=torch.float64)
        return bool((mine - theirs).norm() <= SKETCH_TOLERANCE * max(mine.norm().item(), 1e-12))


def fingerprint_weight(weight: Tensor) -> WeightFingerprint:
    """The :class:`WeightFingerprint` of a 2-D weight (any dtype or device)."""
    if weight.ndim != 2:
        raise ValueError(f"Fingerprints are defined for 2-D weights, got shape {tuple(weight.shape)}.")
    as_float32 = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(as_float32.numpy().tobytes()).hexdigest()
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    rows, columns = as_float32.shape
    left = torch.randn(rows, SKETCH_SIZE, generator=generator, dtype=torch.float64)
    right = torch.randn(columns, SKETCH_SIZE, generator=generator, dtype=torch.float64)
    as_float64 = as_float32.to(torch.float64)
    sketch = (left.T @ as_float64 @ right) / max(as_float64.norm().item(), 1e-30)
    return WeightFingerprint(tuple(as_float32.shape), digest, tuple(round(x, 8) for x in sketch.flatten().tolist()))


__all__ = ["SKETCH_TOLERANCE", "WeightFingerprint", "fingerprint_weight"]
