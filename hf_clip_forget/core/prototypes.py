"""Synthesised visual prototypes: images whose image embedding matches a text embedding.

Text directions alone miss part of the image-side cone (CLIP's modality gap: image and text embeddings of the same
concept are not parallel). A prototype is an image optimised so that the model's image embedding points along a
target text embedding ("a sketch of a dog."); its image embedding and its pre-projection vision features then stand
for that concept on the image side, without any real image.

Optimisation (seeded, deterministic on CPU): each prototype is a ``grid × grid`` RGB logit image, bilinearly
upsampled to the model's input size and squashed by a sigmoid, so that it stays a smooth, valid image; every step
randomly shifts it by a few pixels (jitter), which keeps the optimisation from exploiting single-pixel patterns.
The loss per prototype is ``1 − cos(v, t) + tv_weight · TV(x)``, with ``TV`` the total variation of the image. The
model is used through ``get_image_features`` only; its weights are never changed (gradients go to the pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..families import SUPPORTED_MODEL_CLASSES, find_family
from .joint_embeddings import image_side_embeddings
from .subspace import normalize_rows


@dataclass(frozen=True)
class VisualPrototypes:
    """Prototype images and what the model sees of them (immutable).

    Attributes:
        features: ``(n, h)`` float32 — the input of ``visual_projection`` for each prototype (pre-projection vision
            features); projecting them with any edit of ``visual_projection`` gives their edited embeddings.
        embeddings: ``(n, d)`` float64, L2-normalised image embeddings through the model as it was.
        targets: ``(n,)`` int64 — the row of the target text embedding each prototype was fitted to.
        similarity: ``(n,)`` float64 — final cosine between each prototype's embedding and its target.
        pixels: ``(n, 3, s, s)`` float32 images in [0, 1] (before the processor's normalisation), for inspection.
    """

    features: Tensor
    embeddings: Tensor
    targets: Tensor
    similarity: Tensor
    pixels: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


def _total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels, per image."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def _capture_projection_input(model: nn.Module):
    """A forward pre-hook on ``model.visual_projection`` that records its input (the pre-projection features)."""
    captured: list[Tensor] = []
    family = find_family(model)
    token = family.image.token if family is not None else None

    def hook(module, args):
        # a per-token Linear (FLAVA's): only the embedding's token is a prototype's feature
        captured.append(args[0][:, token] if token is not None and args[0].ndim == 3 else args[0])

    path = family.image.module if family is not None else "visual_projection"
    try:
        projection = model.get_submodule(path)
    except AttributeError:
        projection = None
    if not isinstance(projection, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no `{path}` module; prototypes need a supported dual encoder "
            f"({', '.join(SUPPORTED_MODEL_CLASSES)})."
        )
    return projection.register_forward_pre_hook(hook), captured


def synthesize_prototypes(
    model: nn.Module,
    targets: Tensor,
    *,
    per_target: int = 4,
    steps: int = 60,
    learning_rate: float = 0.1,
    grid: int = 28,
    image_size: int = 224,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    tv_weight: float = 0.05,
    jitter: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
) -> VisualPrototypes:
    """Optimise ``per_target`` images per row of ``targets`` so that their image embeddings match it.

    Args:
        model: a dual encoder with ``get_image_features`` and a ``visual_projection`` module (a ``CLIPModel``, a
            ``VisionTextDualEncoderModel``, or the base model of a ``ForgetPeftModel`` inside
            ``edits_bypassed()``). Left as it was: weights, ``requires_grad`` flags and train/eval mode.
        targets: ``(m, d)`` text embeddings to match (normalised here).
        per_target: prototypes per target (different random initialisations).
        steps: Adam steps on the pixels.
        learning_rate: Adam learning rate on the logit image.
        grid: side of the optimised logit image, upsampled to ``image_size`` (smaller = smoother, cheaper).
        image_size: the model's input size (e.g. ``image_processor.crop_size["height"]``).
        image_mean, image_std: the image processor's normalisation.
        tv_weight: weight of the total-variation regulariser.
        jitter: maximum random shift in pixels per step (0 disables it).
        batch_size: prototypes optimised together (the cost is one forward and backward pass per batch and step).
        seed: seed of the initialisation and the jitter; the same call gives the same prototypes.
        show_progress: show a tqdm bar over optimisation steps.

    Returns:
        :class:`VisualPrototypes` with ``m × per_target`` prototypes, target rows ``0, 0, …, 1, 1, …``.
    """
    for name, value in (("per_target", per_target), ("steps", steps), ("grid", grid), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if targets.ndim != 2 or targets.shape[0] == 0 or not torch.isfinite(targets).all():
        raise ValueError(f"`targets` must be a finite (m, d) tensor with m >= 1, got shape {tuple(targets.shape)}.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    goal = normalize_rows(targets).to(torch.float32)
    target_rows = torch.arange(goal.shape[0]).repeat_interleave(per_target)
    mean = torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    logits_all = 0.5 * torch.randn(len(target_rows), 3, grid, grid, generator=generator)
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=generator) if jitter else None

    def render(logits: Tensor) -> Tensor:
        upsampled = nn.functional.interpolate(
            logits, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        return torch.sigmoid(upsampled)

    def embed(images: Tensor, hook_store: list[Tensor]) -> Tensor:
        hook_store.clear()
        output = image_side_embeddings(model, pixel_values=((images - mean) / std).to(device=device, dtype=dtype))
        return nn.functional.normalize(output.float(), dim=-1)

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    handle, captured = _capture_projection_input(model)
    batches = [
        range(start, min(start + batch_size, len(target_rows))) for start in range(0, len(target_rows), batch_size)
    ]
    progress = tqdm(total=steps * len(batches), desc="Synthesising prototypes", disable=not show_progress)
    results = {"features": [], "embeddings": [], "similarity": [], "pixels": []}
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for batch in batches:
            logits = logits_all[batch.start : batch.stop].clone().requires_grad_(True)
            goal_batch = goal[target_rows[batch.start : batch.stop]].to(device)
            optimizer = torch.optim.Adam([logits], lr=learning_rate)
            with torch.enable_grad():
                for step in range(steps):
                    images = render(logits)
                    if shifts is not None:
                        images = torch.roll(images, shifts=tuple(shifts[step].tolist()), dims=(2, 3))
                    cosine = (embed(images, captured) * goal_batch).sum(dim=-1)
                    loss = (1 - cosine + tv_weight * _total_variation(images)).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    progress.update()
                    progress.set_postfix(cos=f"{cosine.mean().item():.3f}")
            with torch.no_grad():
                images = render(logits)
                embeddings = embed(images, captured)
                results["features"].append(captured[-1].detach().float().cpu())
                results["embeddings"].append(embeddings.double().cpu())
                results["similarity"].append((embeddings * goal_batch).sum(dim=-1).double().cpu())
                results["pixels"].append(images.detach().cpu())
    finally:
        handle.remove()
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
        model.train(was_training)
        progress.close()
    return VisualPrototypes(
        features=torch.cat(results["features"]),
        embeddings=torch.cat(results["embeddings"]),
        targets=target_rows,
        similarity=torch.cat(results["similarity"]),
        pixels=torch.cat(results["pixels"]),
    )
