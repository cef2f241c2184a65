"""A disk cache of image features, keyed on what determines them — never on a model's or a file's name.

The features (:class:`~hf_clip_forget.evaluation.ImageFeatures`) are what the model's image side computes before its
forget-editable part (:mod:`~hf_clip_forget.evaluation.representation`), so an entry is keyed on that representation
(:func:`~hf_clip_forget.evaluation.image_representation`), a fingerprint of the weights and configuration it depends
on (:func:`vision_tower_fingerprint`), the image processor's settings, the dataset's ``datasets`` fingerprint and, for
local data, the size and modification time of every file (:func:`data_files_identity`). New weights or new images at
the same path make a new entry; so do features of another representation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import datasets
import torch
from torch import nn

from .features import ImageFeatures, embed_images, process_state
from .representation import image_representation, image_side


#: Bump when the features computed for the same inputs change meaning; old entries are then ignored. (3: the
#: representation depends on the family, and the fingerprint covers the layers between tower and projection.)
CACHE_FORMAT = 3
#: Top-level modules of a dual encoder without a ``vision_model`` that are not part of its image side.
NOT_VISION = ("text_model", "text_projection", "visual_projection", "logit_scale", "logit_bias")
#: Names of a forget adapter's own tensors in a wrapped layer's state (its factors, not base weights).
_ADAPTER_TENSORS = "projection_edit_"
#: Config entries that name where a model came from, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def _unwrapped_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """``base``'s state under its plain names: a forget layer's base weights as the layer's own, its factors left
    out (cached features never depend on an edit: they are taken before it, or with it bypassed)."""
    return {
        name.replace(".base_layer.", "."): value
        for name, value in base.state_dict().items()
        if _ADAPTER_TENSORS not in name
    }


def _vision_tower(model: nn.Module) -> tuple[dict[str, torch.Tensor], object]:
    """The tensors and configuration the cached features depend on: the vision tower (``vision_model``, else every
    top-level module but the text side's), the modules outside it on the way to the image-side layer (GroupViT's
    ``visual_projection.0``–``2`` before its ``visual_projection.3``), and that layer itself only when its output is
    cached (an output-edit side): a mergeable Linear is applied at projection time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    side = image_side(base)
    state = _unwrapped_state(base)
    config = getattr(base, "config", None)
    container = side.module.split(".")[0] + "."
    if isinstance(getattr(base, "vision_model", None), nn.Module):
        kept = {name: value for name, value in state.items() if name.startswith(("vision_model.", container))}
        config = getattr(config, "vision_config", config)
    else:
        kept = {name: value for name, value in state.items() if name.split(".")[0] not in NOT_VISION}
        kept.update((name, value) for name, value in state.items() if name.startswith(container))
    if side.mergeable:
        kept = {name: value for name, value in kept.items() if not name.startswith(side.module + ".")}
    return kept, config


def _config_json(config) -> str:
    if config is None:
        return "null"
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for key in _PROVENANCE_KEYS:
        values.pop(key, None)
    return json.dumps(values, sort_keys=True, default=str)


def vision_tower_fingerprint(model: nn.Module) -> str:
    """sha256 of the tensors (names, dtypes, shapes and bytes) and configuration that the cached image features
    depend on (the vision tower and what follows it up to the cached point): equal fingerprints mean the same
    features. A mergeable projection, forget adapters and the text side are not part of it."""
    state, config = _vision_tower(model)
    digest = hashlib.sha256(_config_json(config).encode())
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_files_identity(source: str | os.PathLike) -> list[list] | None:
    """``[relative path, size, mtime_ns]`` of every file under a local ``source`` (a file or a directory), or
    ``None`` for a source that is not a local path (a Hub dataset, identified by its ``datasets`` fingerprint)."""
    path = os.path.realpath(os.path.expanduser(os.fspath(source)))
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    else:
        return None
    identity = []
    for file in files:
        stat = os.stat(file)
        identity.append([os.path.relpath(file, os.path.dirname(path)), stat.st_size, stat.st_mtime_ns])
    return identity


def _processor_settings(image_processor: Callable) -> str:
    if hasattr(image_processor, "to_json_string"):
        return image_processor.to_json_string()
    raise TypeError(
        f"Cannot key cached features on a {type(image_processor).__name__} image processor: it has no settings to "
        "compare (`to_json_string`). Use a transformers image processor, or compute features without the cache."
    )


def image_features_key(
    model: nn.Module, image_processor: Callable, dataset: datasets.Dataset, source: str | os.PathLike | None = None
) -> str:
    """The cache key of ``model``'s image features of ``dataset`` (loaded from ``source``)."""
    parts = {
        "format": CACHE_FORMAT,
        "representation": image_representation(model),
        "vision_tower": vision_tower_fingerprint(model),
        "image_processor": _processor_settings(image_processor),
        "dataset": dataset._fingerprint,
        "files": data_files_identity(source) if source is not None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def features_cache_dir() -> str:
    """Where cached features live: ``$HF_HOME/hf_clip_forget/features``."""
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "hf_clip_forget", "features")


def features_cache_path(key: str, cache_dir: str | None = None) -> str:
    """The file that holds (or will hold) the features cached under ``key``."""
    return os.path.join(cache_dir or features_cache_dir(), key + ".safetensors")


def _save_atomically(features: ImageFeatures, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.partial"
    try:
        features.save(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def load_or_embed_image_features(
    key: str,
    model: nn.Module,
    image_processor: Callable,
    dataset: datasets.Dataset,
    *,
    use_cache: bool = True,
    cache_dir: str | None = None,
    accelerator=None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> ImageFeatures:
    """The features cached under ``key``, or :func:`embed_images` of ``dataset`` (saved under ``key``).

    With several processes the main process decides whether the entry exists (so that all of them embed, or
    none) and alone writes it; every process returns all the features.
    """
    state = accelerator if accelerator is not None else process_state()
    path = features_cache_path(key, cache_dir)
    hit = use_cache and os.path.isfile(path)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        hit = broadcast_object_list([hit])[0]
    if hit:
        try:
            return ImageFeatures.load(path)
        except Exception as error:  # noqa: BLE001 - any unreadable entry means the same thing
            raise ValueError(
                f"The cached image features {path!r} cannot be read ({type(error).__name__}: {error}). Delete that "
                "file (it is recomputed on the next run), or pass --no-cache."
            ) from error
    features = embed_images(
        model, dataset, image_processor, accelerator=state, batch_size=batch_size, show_progress=show_progress
    )
    if use_cache and state.is_main_process:
        _save_atomically(features, path)
    return features
