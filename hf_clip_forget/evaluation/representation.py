"""What the evaluation harness caches per image, and how every version of a model turns it into image embeddings.

The images of a labelled set are embedded once (:class:`ImageFeatures`); every version of the model — unedited,
edited, merged, with its edits bypassed or its adapters disabled — then gets its image embeddings from the same
cached features by *projecting* them (:func:`project_image_features`): computing what the model does after the
cached point, as it is now. A forget adapter edits only the family's image-side layer
(:class:`hf_clip_forget.families.EmbeddingSide`), so the cached point is chosen per side such that nothing before it
depends on the edit:

- a **mergeable** side (an ``nn.Linear``, CLIP's ``visual_projection``): the *input* of that Linear, one vector per
  image. For a Linear that runs on every token while the embedding is one of them (``EmbeddingSide.token``: FLAVA's
  first token), its input at that token only: a per-token Linear commutes with picking a token, so this is exact.
  Projecting applies the model's own Linear (its forget layer: edited, merged, bypassed or disabled).
- an **output-edit** side (``mergeable=False``: SigLIP's and SigLIP 2's pooling heads, whose inputs are the whole
  token sequence and, for SigLIP 2, its attention mask; ALIGN's average pooling of a convolutional map): the
  *unedited embedding* itself, computed with the forget layer bypassed. Projecting applies the edit the model's
  forget layer applies now (the union of its active adapters; none while bypassed or disabled). That edit acts
  linearly on the embedding's channels alone, and ALIGN's map is average-pooled into the embedding, which commutes
  with it, so editing the cached embedding equals editing inside the model.

Either way the projection equals the family's image embedding function
(:func:`hf_clip_forget.core.image_side_embeddings`) of the same processor outputs. :func:`image_representation`
names what is cached; it is saved with the features and is part of the cache key, and a projection checks it, so
features of one kind are never projected as the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import torch
from torch import Tensor, nn

from ..core.joint_embeddings import embedding_side, image_side_embeddings
from ..families import EmbeddingSide
from ..tuners.projection_edit import ProjectionEditLayer


#: The image-side layer of models whose family is unknown (the family layer names it for supported ones).
PROJECTION_NAME = "visual_projection"


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFeatures:
    """The cached image-side features of a labelled image set.

    Attributes:
        features: ``(n, h)`` float32 CPU tensor: for each image, in dataset order, what :func:`pre_projection_features`
            returns (the module docstring says what that is for each kind of image side).
        labels: ``(n,)`` int64 class indices into ``class_names``.
        class_names: the names of the dataset's ``ClassLabel``: every class, including those without images.
        domains: ``(n,)`` int64 domain indices into ``domain_names``, or ``None``.
        domain_names: the domains, or ``None``.
        representation: :func:`image_representation` of the model the features were computed with, checked when
            they are projected; ``None`` for features assembled by hand (then not checked).
    """

    features: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    domains: Tensor | None = None
    domain_names: tuple[str, ...] | None = None
    representation: str | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.labels.shape != (n,):
            raise ValueError(
                f"`features` must be (n, h) and `labels` (n,), got {tuple(self.features.shape)} and "
                f"{tuple(self.labels.shape)}."
            )
        if (self.domains is None) != (self.domain_names is None):
            raise ValueError("Give both `domains` and `domain_names`, or neither.")
        if self.domains is not None and self.domains.shape != (n,):
            raise ValueError(f"`domains` must be ({n},), got {tuple(self.domains.shape)}.")

    def __len__(self) -> int:
        return self.features.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write the features, labels, names and representation to one ``.safetensors`` file."""
        from safetensors.torch import save_file

        tensors = {"features": self.features.contiguous(), "labels": self.labels.contiguous()}
        if self.domains is not None:
            tensors["domains"] = self.domains.contiguous()
        metadata = {"class_names": json.dumps(list(self.class_names))}
        if self.domain_names is not None:
            metadata["domain_names"] = json.dumps(list(self.domain_names))
        if self.representation is not None:
            metadata["representation"] = self.representation
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageFeatures:
        """Read features written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if "class_names" not in metadata or "features" not in tensors:
            raise ValueError(f"{os.fspath(path)!r} was not written by `ImageFeatures.save`.")
        domain_names = metadata.get("domain_names")
        return cls(
            features=tensors["features"],
            labels=tensors["labels"],
            class_names=tuple(json.loads(metadata["class_names"])),
            domains=tensors.get("domains"),
            domain_names=tuple(json.loads(domain_names)) if domain_names is not None else None,
            representation=metadata.get("representation"),
        )


# ------------------------------------------------------------------------------------------ the cached point
def image_side(model: nn.Module) -> EmbeddingSide:
    """The image side of ``model``'s family; for a model outside the family table (a custom dual encoder), a plain
    ``nn.Linear`` named :data:`PROJECTION_NAME` whose output ``get_image_features`` returns."""
    side = embedding_side(model, "visual")
    return side if side.module else dataclasses.replace(side, module=PROJECTION_NAME)


def image_representation(model: nn.Module) -> str:
    """What :func:`pre_projection_features` caches for ``model``: ``"input of visual_projection"`` (``… at token
    0`` for a per-token Linear), or ``"unedited embedding (output of vision_model.head)"`` for an output-edit side."""
    side = image_side(model)
    if not side.mergeable:
        return f"unedited embedding (output of {side.module})"
    return f"input of {side.module}" + (f" at token {side.token}" if side.token is not None else "")


def find_visual_projection(model: nn.Module) -> nn.Module:
    """The outermost module at the image-side layer path of ``model``'s family (``hf_clip_forget.families``): a
    forget layer when the model holds adapters on it, else the plain module."""
    path = image_side(model).module
    matches = [(name, module) for name, module in model.named_modules() if name == path or name.endswith("." + path)]
    if not matches:
        raise ValueError(
            f"{type(model).__name__} has no `{path}` layer, so it is not a CLIP-style dual encoder. Use one of the "
            "supported model classes (hf_clip_forget.families.SUPPORTED_MODEL_CLASSES)."
        )
    return min(matches, key=lambda item: item[0].count("."))[1]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on_model(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``inputs`` on the model's device, floating-point ones in its dtype (masks and patch grids keep theirs)."""
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
    }


@contextlib.contextmanager
def _calls_of(module: nn.Module, what: str):
    """Collect, in the yielded list, the input (``what="input"``) or the output of every call of ``module``."""
    calls: list[Tensor] = []
    if what == "input":
        handle = module.register_forward_pre_hook(
            lambda _, args, kwargs: calls.append(args[0] if args else next(iter(kwargs.values()))), with_kwargs=True
        )
    else:
        handle = module.register_forward_hook(lambda _, args, output: calls.append(output))
    try:
        yield calls
    finally:
        handle.remove()


@torch.no_grad()
def pre_projection_features(model: nn.Module, pixel_values: Tensor | None = None, **inputs: Tensor) -> Tensor:
    """The ``(batch, h)`` features the harness caches for these images (see the module docstring): the input of
    ``model``'s image-side Linear (at its declared token), or for an output-edit side the unedited embedding,
    computed by the family's image embedding function from the image processor's outputs (``pixel_values`` and,
    e.g. for SigLIP 2, ``pixel_attention_mask`` and ``spatial_shapes``). On the model's device and in its dtype."""
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    inputs = _on_model(model, inputs)
    side = image_side(model)
    layer = find_visual_projection(model)
    if side.mergeable:
        with _calls_of(layer, "input") as calls:
            image_side_embeddings(model, **inputs)
        _check_one_call(calls, side)
        features = calls[0]
        if side.token is not None and features.ndim == 3:  # a per-token Linear: only the embedding's token counts
            features = features[:, side.token]
    else:
        bypassed = layer.edits_bypassed() if isinstance(layer, ProjectionEditLayer) else contextlib.nullcontext()
        with bypassed, _calls_of(layer, "output") as calls:
            features = image_side_embeddings(model, **inputs)
        _check_one_call(calls, side)
    if features.ndim != 2:
        raise RuntimeError(
            f"The {image_representation(model)} has shape {tuple(features.shape)}, not one vector per image; this "
            "model's image embeddings cannot be computed from cached features."
        )
    return features


def _check_one_call(calls: list, side: EmbeddingSide) -> None:
    if len(calls) != 1:
        raise RuntimeError(
            f"Embedding a batch of images called `{side.module}` {len(calls)} times instead of once; this model's "
            "image embeddings cannot be computed from cached features."
        )


# ------------------------------------------------------------------------------------------------- projecting
def _current_output_edit(layer: nn.Module):
    """The edit ``layer`` applies to its output at its next forward (``_ForgetModule.forward``), or ``None``: none
    on a plain module, while its edits are bypassed or its adapters disabled, or without active adapters; else the
    combined edit of its active adapters (an output-edit layer is never merged)."""
    return layer.current_edit() if isinstance(layer, ProjectionEditLayer) else None


def _check_representation(model: nn.Module, features: ImageFeatures | Tensor) -> Tensor:
    if not isinstance(features, ImageFeatures):
        return features
    expected = image_representation(model)
    if features.representation is not None and features.representation != expected:
        raise ValueError(
            f"These image features hold the {features.representation}, but {type(model).__name__}'s image "
            f"embeddings are computed from the {expected}. Embed the images with this model (`embed_images`)."
        )
    return features.features


@torch.no_grad()
def project_image_features(model: nn.Module, features: ImageFeatures | Tensor, batch_size: int = 8192) -> Tensor:
    """Image embeddings of ``model`` as it is now (adapters active, merged, bypassed or disabled) from cached
    ``features`` (:func:`pre_projection_features`). Returns an ``(n, d)`` float32 CPU tensor, unnormalised, equal to
    the family's image embedding function of the images the features were computed from."""
    tensor = _check_representation(model, features)
    layer = find_visual_projection(model)
    if image_side(model).mergeable:
        weight = next(layer.parameters())  # the (base) projection weight: its device and dtype
        project, device, dtype = layer, weight.device, weight.dtype
        width = getattr(layer, "out_features", weight.shape[0])
    else:
        edit = _current_output_edit(layer)
        project = edit.apply if edit is not None else (lambda chunk: chunk)
        device, dtype = (edit.left.device if edit is not None else tensor.device), torch.float32
        width = tensor.shape[1]
    chunks = [
        project(tensor[start : start + batch_size].to(device, dtype)).float().cpu()
        for start in range(0, tensor.shape[0], batch_size)
    ]
    return torch.cat(chunks) if chunks else tensor.new_zeros(0, width, dtype=torch.float32)
