"""The image side of the evaluation: the vision tower's pre-projection features of a labelled image set.

The images are embedded once: what is cached is the vision tower's pooled output, the *input* of
``visual_projection`` (:class:`ImageFeatures`). A forget adapter only edits the projection layers, so every version
of the model — unedited, edited, merged, or with adapters bypassed — gets its image embeddings by applying its own
``visual_projection`` to the same cached features (:func:`project_image_features`), which equals what
``get_image_features`` computes from the pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..families import find_family
from .data import AUTO, check_labelled_images


#: The image-side layer of models whose family is unknown (the family layer names it for supported ones).
PROJECTION_NAME = "visual_projection"


# ------------------------------------------------------------------------------------------------- image features
@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """The cached vision-tower features of a labelled image set.

    Attributes:
        features: ``(n, h)`` float32 CPU tensor: for each image, in dataset order, the input of the model's
            ``visual_projection`` (the vision tower's pooled output, before any projection or edit).
        labels: ``(n,)`` int64 class indices into ``class_names``.
        class_names: the names of the dataset's ``ClassLabel``: every class, including those without images.
        domains: ``(n,)`` int64 domain indices into ``domain_names``, or ``None``.
        domain_names: the domains, or ``None``.
    """

    features: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    domains: Tensor | None = None
    domain_names: tuple[str, ...] | None = None

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
        """Write the features, labels and names to one ``.safetensors`` file."""
        from safetensors.torch import save_file

        tensors = {"features": self.features.contiguous(), "labels": self.labels.contiguous()}
        if self.domains is not None:
            tensors["domains"] = self.domains.contiguous()
        metadata = {"class_names": json.dumps(list(self.class_names))}
        if self.domain_names is not None:
            metadata["domain_names"] = json.dumps(list(self.domain_names))
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
        )


def find_visual_projection(model: nn.Module) -> nn.Module:
    """The outermost module at the image-side layer path of ``model``'s family (``hf_clip_forget.families``): a
    forget layer when the model holds adapters on it, else the plain ``nn.Linear``."""
    family = find_family(model)
    path = family.image.module if family is not None else PROJECTION_NAME
    matches = [(name, module) for name, module in model.named_modules() if name == path or name.endswith("." + path)]
    if not matches:
        raise ValueError(
            f"{type(model).__name__} has no `{path}` layer, so it is not a CLIP-style dual encoder. Use one of the "
            "supported model classes (hf_clip_forget.families.SUPPORTED_MODEL_CLASSES)."
        )
    return min(matches, key=lambda item: item[0].count("."))[1]


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def pre_projection_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """The input of ``model``'s ``visual_projection`` while ``model.get_image_features(pixel_values=...)`` runs
    (the vision tower's pooled output), captured with a forward pre-hook. Same device and dtype as the model."""
    projection = find_visual_projection(model)
    captured: list[Tensor] = []

    def hook(module, args, kwargs):
        captured.append(args[0] if args else next(iter(kwargs.values())))

    handle = projection.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.get_image_features(pixel_values=pixel_values.to(_model_device(model), _floating_dtype(model)))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"`get_image_features` called `{PROJECTION_NAME}` {len(captured)} times instead of once; this model's "
            "image embeddings cannot be computed from cached pre-projection features."
        )
    return captured[0]


@torch.no_grad()
def project_image_features(model: nn.Module, features: ImageFeatures | Tensor, batch_size: int = 8192) -> Tensor:
    """Image embeddings of ``model`` as it is now (adapters active, merged or bypassed): its ``visual_projection``
    applied to cached pre-projection ``features``. Returns an ``(n, d)`` float32 CPU tensor, unnormalised, equal
    to ``model.get_image_features`` of the images the features were computed from."""
    tensor = features.features if isinstance(features, ImageFeatures) else features
    projection = find_visual_projection(model)
    weight = next(projection.parameters())  # the (base) projection weight: its device and dtype
    chunks = [
        projection(tensor[start : start + batch_size].to(weight.device, weight.dtype)).float().cpu()
        for start in range(0, tensor.shape[0], batch_size)
    ]
    return torch.cat(chunks) if chunks else tensor.new_zeros(0, weight.shape[0])


def _is_transformers_processor(processor: Any) -> bool:
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ProcessorMixin

    return isinstance(processor, (ImageProcessingMixin, ProcessorMixin))


def _pixel_values(image_processor: Callable, images: list) -> Tensor:
    images = [
        image.convert("RGB") if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB" else image
        for image in images
    ]
    if _is_transformers_processor(image_processor):
        output = image_processor(images=images, return_tensors="pt")
    else:
        output = image_processor(images)
    pixel_values = output if isinstance(output, Tensor) else output["pixel_values"]
    if not isinstance(pixel_values, Tensor):
        pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != len(images):
        raise ValueError(
            f"The image processor returned pixel values of shape {tuple(pixel_values.shape)} for {len(images)} "
            "images; it must return a (batch, channels, height, width) tensor, alone or as `{'pixel_values': ...}`."
        )
    return pixel_values


class _ImageBatches:
    """``collate_fn`` of the embedding loop: dataset indices → ``(indices, pixel_values)``. Picklable, for
    ``num_workers > 0``."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, image_processor: Callable) -> None:
        self.images = dataset.select_columns([image_column])
        self.image_column = image_column
        self.image_processor = image_processor

    def __call__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images = self.images[list(indices)][self.image_column]
        return torch.tensor(indices, dtype=torch.long), _pixel_values(self.image_processor, images)


def _column_values(dataset: datasets.Dataset, column: str) -> list:
    return list(dataset.select_columns([column]).with_format("python")[column])


def _labels_and_domains(dataset: datasets.Dataset, columns) -> tuple[Tensor, tuple, Tensor | None, tuple | None]:
    class_names = tuple(dataset.features[columns.label].names)
    labels = torch.tensor(_column_values(dataset, columns.label), dtype=torch.long)
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(
            f"{unlabelled} of {len(labels)} images have no label (-1 in the `{columns.label}` column; test splits of "
            "some Hub datasets hide their labels). Evaluate a labelled split, or drop them: "
            f"`dataset.filter(lambda label: label >= 0, input_columns={columns.label!r})`."
        )
    if columns.domain is None:
        return labels, class_names, None, None
    feature = dataset.features[columns.domain]
    values = _column_values(dataset, columns.domain)
    if isinstance(feature, datasets.ClassLabel):
        return labels, class_names, torch.tensor(values, dtype=torch.long), tuple(feature.names)
    domain_names = tuple(sorted(set(values)))
    index = {name: i for i, name in enumerate(domain_names)}
    return labels, class_names, torch.tensor([index[v] for v in values], dtype=torch.long), domain_names


def _place(model: nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device`` (as ``accelerator.prepare`` would), unless it is dispatched over devices."""
    if getattr(model, "hf_device_map", None) is None and _model_device(model) != device:
        model.to(device)


#: Environment variables in which launchers (torchrun, ``accelerate launch``, MPI) give the number of processes.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher of this one started (1 for a plain run)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(list(WORLD_SIZE_VARIABLES), 1)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def process_state():
    """The ``accelerate.PartialState`` of this run: one process per launched process, on CPUs too.

    ``PartialState()`` alone sets up a single process under ``torchrun`` on a machine without an accelerator (it
    needs ``cpu=True`` for gloo), so every process would do the whole job; this one asks for the CPU backend there
    (or with ``ACCELERATE_USE_CPU``), and raises if the processes still do not form one group.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not _has_accelerator())
    launched = launched_processes()
    if state.num_processes != launched:
        raise RuntimeError(
            f"This run was launched as {launched} processes, but accelerate set up {state.num_processes} "
            f"({state.distributed_type}), so each would do the whole job. Launch with `torchrun --nproc_per_node N` "
            "(or `accelerate launch --multi_gpu --num_processes N` on GPUs)."
        )
    return state


def _shard(items: list, num_processes: int, index: int) -> list:
    """The ``index``-th of ``num_processes`` contiguous, near-equal slices of ``items`` (no padding)."""
    size, extra = divmod(len(items), num_processes)
    start = index * size + min(index, extra)
    return items[start : start + size + (index < extra)]


@torch.no_grad()
def embed_images(
    model: nn.Module,
    dataset: datasets.Dataset,
    image_processor: Callable,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator=None,
    show_progress: bool = True,
) -> ImageFeatures:
    """Run the vision tower over every image of ``dataset`` once and cache its pre-projection features.

    The work is spread over the processes of a ``torchrun`` (or ``accelerate launch``) run: the batches are cut
    as in a one-process run, each process embeds a contiguous share of them (no image twice, no padding), and the
    features are gathered, so every process ends up with all of them, in dataset order, each computed from the
    same batch as in a one-process run. The model is moved to the process's device (as ``accelerator.prepare``
    would), unless it is dispatched over several devices (``device_map``).

    Args:
        model: a dual encoder (``CLIPModel``, ``VisionTextDualEncoderModel``, or a forget ``PeftModel`` of one).
        dataset: labelled images (see :func:`hf_clip_forget.evaluation.load_labelled_images`).
        image_processor: the model's image processor (``AutoImageProcessor`` / ``CLIPProcessor``), or any callable
            ``list of images -> {"pixel_values": (b, c, h, w) tensor}`` (or the tensor itself).
        image_column, label_column, domain_column: see :func:`hf_clip_forget.evaluation.resolve_columns`.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` workers decoding and preprocessing images.
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``) giving the device and the processes; by
            default :func:`process_state`, which leaves the mixed-precision settings of an ``Accelerator`` you
            create later free.
        show_progress: show a progress bar (on the main process).

    Returns:
        :class:`ImageFeatures`, in dataset order.
    """
    from torch.utils.data import DataLoader

    columns = check_labelled_images(dataset, image_column, label_column, domain_column)
    if not callable(image_processor):
        raise TypeError(
            f"`image_processor` must be callable (an image processor, or images -> pixel values), got "
            f"{type(image_processor).__name__}. Load the model's with `AutoImageProcessor.from_pretrained(...)`."
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    find_visual_projection(model)  # fail before any image is decoded
    state = accelerator if accelerator is not None else process_state()
    _place(model, state.device)
    labels, class_names, domains, domain_names = _labels_and_domains(dataset, columns)

    batches = [
        list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)
    ]
    loader = DataLoader(
        range(len(dataset)),
        batch_sampler=_shard(batches, state.num_processes, state.process_index),
        collate_fn=_ImageBatches(dataset, columns.image, image_processor),
        num_workers=num_workers,
    )
    progress = tqdm(
        loader, desc="Embedding images", unit="batch", disable=not show_progress or not state.is_main_process
    )
    indices, features = [], []
    for batch_indices, pixel_values in progress:
        indices.append(batch_indices)
        features.append(pre_projection_features(model, pixel_values).float().cpu())
    ordered = _gather_in_order(state, indices, features, len(dataset))
    return ImageFeatures(ordered, labels, class_names, domains, domain_names)


def _gather_in_order(state, indices: list[Tensor], features: list[Tensor], num_images: int) -> Tensor:
    """Every process's features, concatenated in process order — which is dataset order — and checked to be so."""
    local = (torch.cat(indices), torch.cat(features)) if indices else None
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        shards = [shard for shard in gather_object([local]) if shard is not None]
    else:
        shards = [local] if local is not None else []
    all_indices = torch.cat([shard[0] for shard in shards])
    if not torch.equal(all_indices, torch.arange(num_images)):
        raise RuntimeError(
            f"The gathered image features do not cover the {num_images} images once each, in order (got "
            f"{all_indices.numel()}); this is a bug, please report it."
        )
    return torch.cat([shard[1] for shard in shards])
