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

The edit also depends on the towers that embedded its prompts (and its prototypes): a base with the same projections
but another text or vision tower would be given directions computed elsewhere. A :class:`TowerFingerprint` covers
every tensor of a module cheaply — the sha256 of the tensors' names and shapes (exact), and a sketch ``G s / ‖s‖`` of
a fixed sample ``s`` of :data:`TOWER_SAMPLE` entries of each tensor, with a fixed seeded Gaussian ``G`` (robust to
dtype casts as above; another tower, or one tensor of it replaced, moves it far beyond the tolerance).
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


#: Entries sampled per tensor by :func:`fingerprint_tensors`, at fixed evenly spaced positions.
TOWER_SAMPLE = 64
#: Length of a tower's sketch.
TOWER_SKETCH_SIZE = 16


@dataclass(frozen=True)
class TowerFingerprint:
    """Identity of a module's tensors: how many, the sha256 of their names and shapes, and a sampled sketch."""

    tensors: int
    structure: str
    sketch: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"kind": "sampled", "tensors": self.tensors, "structure": self.structure, "sketch": list(self.sketch)}

    @classmethod
    def from_dict(cls, data: dict) -> TowerFingerprint:
        if data.get("kind") != "sampled" or len(data.get("sketch", ())) != TOWER_SKETCH_SIZE:
            raise ValueError(f"not a sampled tower fingerprint: {sorted(data)}")
        return cls(int(data["tensors"]), str(data["structure"]), tuple(float(x) for x in data["sketch"]))

    @property
    def short(self) -> str:
        return f"{self.tensors} tensors, structure {self.structure[:12]}"

    def matches(self, other: TowerFingerprint) -> bool:
        """Same tensor names and shapes, and the same sampled values up to a cast between float dtypes."""
        if (self.tensors, self.structure) != (other.tensors, other.structure):
            return False
        mine, theirs = torch.tensor(self.sketch, dtype=torch.float64), torch.tensor(other.sketch, dtype=torch.float64)
        return bool((mine - theirs).norm() <= SKETCH_TOLERANCE * max(mine.norm().item(), 1e-12))


def fingerprint_tensors(tensors: dict[str, Tensor]) -> TowerFingerprint:
    """The :class:`TowerFingerprint` of named tensors (floating ones are sampled; every name and shape counts).

    The samples of all tensors, in name order, form one vector ``s``; the sketch is ``G s / ‖s‖`` with one fixed
    seeded Gaussian ``G`` (one draw, so the cost is a few operations per tensor)."""
    structure = hashlib.sha256()
    samples = []
    for name in sorted(tensors):
        tensor = tensors[name]
        structure.update(f"|{name}|{tuple(tensor.shape)}".encode())
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            flat = tensor.detach().reshape(-1)
            samples.append(flat[_sample_positions(flat.numel(), flat.device)].to("cpu", torch.float64))
    sample = torch.cat(samples) if samples else torch.zeros(0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    projection = torch.randn(TOWER_SKETCH_SIZE, sample.numel(), generator=generator, dtype=torch.float64)
    sketch = (projection @ sample) / max(sample.norm().item(), 1e-30)
    return TowerFingerprint(len(tensors), structure.hexdigest(), tuple(round(x, 8) for x in sketch.tolist()))


def _sample_positions(numel: int, device: torch.device) -> Tensor:
    """:data:`TOWER_SAMPLE` evenly spaced flat positions of a tensor with ``numel`` entries (all, when fewer)."""
    return torch.linspace(0, numel - 1, min(TOWER_SAMPLE, numel), device=device).round().long()


__all__ = [
    "SKETCH_TOLERANCE",
    "TOWER_SAMPLE",
    "TowerFingerprint",
    "WeightFingerprint",
    "fingerprint_tensors",
    "fingerprint_weight",
]
