"""A linear probe: can a class still be read off a set of vectors by a linear classifier?

Used by the audit to ask whether a forget edit removed a class from the embeddings *for any linear reader*, not only
for the zero-shot classifier built from its name (after INLP's linear erasure, a fresh probe can still recover what
the erased classifier no longer sees). Works on tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearProbeResult:
    """Held-out performance of an L2-regularised logistic regression separating one class from the rest.

    The probe minimises ``mean_i w_i · log(1 + exp(−y_i (⟨v, z_i⟩ + c))) + λ ‖v‖²`` on standardised vectors ``z``
    (per-feature mean 0, standard deviation 1 on the training part), with class weights ``w`` that balance the two
    classes, and is scored on a disjoint, stratified test part.

    Attributes:
        balanced_accuracy: mean of the true-positive and true-negative rates on the test part (0.5 = chance).
        positives_train, positives_test, negatives_train, negatives_test: how many vectors each part held.
    """

    balanced_accuracy: float
    positives_train: int
    positives_test: int
    negatives_train: int
    negatives_test: int


def _stratified_split(is_positive: Tensor, test_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    train, test = [], []
    for mask in (is_positive, ~is_positive):
        indices = mask.nonzero().flatten()
        indices = indices[torch.randperm(len(indices), generator=generator)]
        cut = max(1, round(len(indices) * test_fraction))
        test.append(indices[:cut])
        train.append(indices[cut:])
    return torch.cat(train), torch.cat(test)


def _fit(vectors: Tensor, targets: Tensor, l2: float, steps: int) -> tuple[Tensor, Tensor]:
    positives = targets.sum()
    weights = torch.where(targets > 0, 0.5 / positives, 0.5 / (len(targets) - positives))
    signs = targets * 2 - 1
    direction = torch.zeros(vectors.shape[1], dtype=vectors.dtype, requires_grad=True)
    offset = torch.zeros((), dtype=vectors.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([direction, offset], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        margins = signs * (vectors @ direction + offset)
        value = (weights * torch.nn.functional.softplus(-margins)).sum() + l2 * direction.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return direction.detach(), offset.detach()


def linear_probe(
    vectors: Tensor,
    is_positive: Tensor,
    test_fraction: float = 0.3,
    l2: float = 1e-3,
    steps: int = 200,
    seed: int = 0,
) -> LinearProbeResult:
    """Train and score a balanced logistic-regression probe (see :class:`LinearProbeResult`).

    Args:
        vectors: ``(n, d)`` vectors (embeddings or features), any dtype (computed in float64).
        is_positive: ``(n,)`` booleans, the class to read off.
        test_fraction: share of each class held out for scoring.
        l2: ridge weight λ on the standardised scale.
        steps: L-BFGS iterations.
        seed: seed of the split.

    Raises ``ValueError`` when either class has fewer than 2 vectors (nothing to train and test on).
    """
    if vectors.ndim != 2 or is_positive.shape != (vectors.shape[0],):
        raise ValueError(f"`vectors` must be (n, d) and `is_positive` (n,), got {tuple(vectors.shape)}, "
                         f"{tuple(is_positive.shape)}.")  # fmt: skip
    is_positive = is_positive.bool()
    counts = int(is_positive.sum()), int((~is_positive).sum())
    if min(counts) < 2:
        raise ValueError(
            f"A linear probe needs at least 2 vectors of the class and 2 of the rest, got {counts[0]} and {counts[1]}."
        )
    generator = torch.Generator().manual_seed(seed)
    train, test = _stratified_split(is_positive, test_fraction, generator)
    data = vectors.detach().to(torch.float64)
    mean, std = data[train].mean(dim=0), data[train].std(dim=0).clamp_min(1e-12)
    data = (data - mean) / std
    targets = is_positive.to(torch.float64)
    with torch.enable_grad():
        direction, offset = _fit(data[train], targets[train], l2, steps)
    predicted = (data[test] @ direction + offset) > 0
    truth = is_positive[test]
    rates = [(predicted[truth] == True).double().mean(), (predicted[~truth] == False).double().mean()]  # noqa: E712
    return LinearProbeResult(
        balanced_accuracy=float(sum(rates) / 2),
        positives_train=int(is_positive[train].sum()),
        positives_test=int(truth.sum()),
        negatives_train=int((~is_positive[train]).sum()),
        negatives_test=int((~truth).sum()),
    )


__all__ = ["LinearProbeResult", "linear_probe"]
