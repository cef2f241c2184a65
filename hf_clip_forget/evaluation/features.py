"""The image side of the evaluation: embedding a labelled image set once, shared among processes.

:func:`embed_images` runs every image through the model's image side once and keeps, per image, the features
:func:`~hf_clip_forget.evaluation.representation.pre_projection_features` returns: the input of the image-side
Linear, or for an output-edit family (SigLIP, SigLIP 2, ALIGN) the unedited embedding (the representation module
says why each is exact). Every output of the image processor that the family's image embedding function takes is
passed on (SigLIP 2's ``pixel_attention_mask`` and ``spatial_shapes`` with its patches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.joint_embeddings import accepted_inputs
from .data import AUTO, check_labelled_images
from .representation import (
    ImageFeatures,
    _model_device,
    find_visual_projection,
    image_representation,
    pre_projection_features,
)


def _is_transformers_processor(processor: Any) -> bool:
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ProcessorMixin

    return isinstance(processor, (ImageProcessingMixin, ProcessorMixin))


def _image_inputs(image_processor: Callable, images: list, accepted: frozenset[str]) -> dict[str, Tensor]:
    """The image processor's outputs for ``images`` that the model's image embedding function takes (``accepted``),
    as tensors, each checked to hold one entry per image."""
    images = [
        image.convert("RGB") if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB" else image
        for image in images
    ]
    if _is_transformers_processor(image_processor):
        output = image_processor(images=images, return_tensors="pt")
    else:
        output = image_processor(images)
    if isinstance(output, Tensor):
        output = {"pixel_values": output}
    if not isinstance(output, Mapping) or "pixel_values" not in output:
        raise ValueError(
            f"The image processor returned {type(output).__name__}; it must return the `pixel_values` tensor, alone "
            "or in a mapping with the other inputs of the model's image side (`{'pixel_values': ...}`)."
        )
    inputs = {key: value for key, value in output.items() if key in accepted}
    inputs = {key: value if isinstance(value, Tensor) else torch.as_tensor(value) for key, value in inputs.items()}
    shapes = {key: tuple(value.shape) for key, value in inputs.items()}
    if any(not shape or shape[0] != len(images) for shape in shapes.values()):
        raise ValueError(
            f"The image processor returned inputs of shapes {shapes} for {len(images)} images; each must hold "
            "one entry per image along its first axis."
        )
    return inputs


class _ImageBatches:
    """``collate_fn`` of the embedding loop: dataset indices → ``(indices, image inputs)``, the inputs being those
    of the image processor's outputs that the model's image side takes. Picklable, for ``num_workers > 0``."""

    def __init__(
        self, dataset: datasets.Dataset, image_column: str, image_processor: Callable, accepted: frozenset[str]
    ) -> None:
        self.images = dataset.select_columns([image_column])
        self.image_column = image_column
        self.image_processor = image_processor
        self.accepted = accepted

    def __call__(self, indices: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.images[list(indices)][self.image_column]
        return torch.tensor(indices, dtype=torch.long), _image_inputs(self.image_processor, images, self.accepted)


def image_batches(model: nn.Module, dataset: datasets.Dataset, image_column: str, image_processor: Callable):
    """The :class:`_ImageBatches` collate function of ``model``'s image side."""
    return _ImageBatches(dataset, image_column, image_processor, frozenset(accepted_inputs(model, "visual")))


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


#: Convolutions from which a tower counts as convolutional (a ViT has one: its patch embedding).
MIN_CONVOLUTIONS_FOR_CHANNELS_LAST = 2


@contextlib.contextmanager
def channels_last_on_cpu(model: nn.Module, device: torch.device) -> Iterator[bool]:
    """Within this context, the 2-D convolution weights of a convolutional ``model`` on the CPU are stored
    channels-last (NHWC), which PyTorch's CPU kernels (oneDNN) run faster — measured 2.2× on the demo model's
    EfficientNet-Lite tower (``scripts/benchmark_encoding.py``); the results agree with the default layout to float
    rounding. Yields whether it applies; on exit every weight is its original tensor again (nothing is copied back).
    ViTs (one patch convolution) and accelerators are left as they are.
    """
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if device.type != "cpu" or len(convolutions) < MIN_CONVOLUTIONS_FOR_CHANNELS_LAST:
        yield False
        return
    originals = {}
    for convolution in convolutions:
        weight = convolution.weight
        if weight.dim() == 4 and not weight.is_contiguous(memory_format=torch.channels_last):
            originals[convolution] = weight.data
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        for convolution, data in originals.items():
            convolution.weight.data = data


def _channels_last_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        key: value.contiguous(memory_format=torch.channels_last)
        if key == "pixel_values" and value.dim() == 4
        else value
        for key, value in inputs.items()
    }


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
    """Run the model's image side over every image of ``dataset`` once and keep, per image, the features its
    versions are all projected from (:func:`~hf_clip_forget.evaluation.pre_projection_features`).

    On the CPU, a convolutional image tower runs with channels-last weights and inputs (:func:`channels_last_on_cpu`).
    The work is spread over the processes of a ``torchrun`` (or ``accelerate launch``) run: the batches are cut
    as in a one-process run, each process embeds a contiguous share of them (no image twice, no padding), and the
    features are gathered, so every process ends up with all of them, in dataset order, each computed from the
    same batch as in a one-process run. The model is moved to the process's device (as ``accelerator.prepare``
    would), unless it is dispatched over several devices (``device_map``).

    Args:
        model: a dual encoder of a supported family (``hf_clip_forget.families``), or a forget ``PeftModel`` of one.
        dataset: labelled images (see :func:`hf_clip_forget.evaluation.load_labelled_images`).
        image_processor: the model's image processor (``AutoImageProcessor`` / ``CLIPProcessor``), or any callable
            ``list of images -> {"pixel_values": tensor, ...}`` (or the ``pixel_values`` tensor itself). Every
            output the family's image embedding function takes is passed on (SigLIP 2's ``pixel_attention_mask``
            and ``spatial_shapes``); each must have one entry per image.
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
        collate_fn=image_batches(model, dataset, columns.image, image_processor),
        num_workers=num_workers,
    )
    progress = tqdm(
        loader, desc="Embedding images", unit="batch", disable=not show_progress or not state.is_main_process
    )
    indices, features = [], []
    with channels_last_on_cpu(model, state.device) as channels_last:
        for batch_indices, inputs in progress:
            indices.append(batch_indices)
            inputs = _channels_last_inputs(inputs) if channels_last else inputs
            features.append(pre_projection_features(model, **inputs).float().cpu())
    ordered = _gather_in_order(state, indices, features, len(dataset))
    return ImageFeatures(ordered, labels, class_names, domains, domain_names, image_representation(model))


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
