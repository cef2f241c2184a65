"""Zero-shot classification of a labelled image set by a dual encoder, before and after a forget edit.

The images are embedded once: what is cached is the vision tower's pooled output, the *input* of
``visual_projection`` (:class:`ImageFeatures`). A forget adapter only edits the projection layers, so every version
of the model — unedited, edited, merged, or with adapters bypassed — gets its image embeddings by applying its own
``visual_projection`` to the same cached features (:func:`project_image_features`), which equals what
``get_image_features`` computes from the pixels.

Each image is classified among *all* classes of the dataset (forgotten ones stay candidates) by the cosine
similarity of its embedding with the classes' template-averaged text embeddings; accuracies are computed with the
``forgetting_accuracy`` `evaluate` metric shipped with this package.

Example::

    from hf_clip_forget.evaluation import evaluate_edit, load_labelled_images

    dataset = load_labelled_images("../shared/data/pacs/test.parquet")
    model = clip.add_forget_adapter(["dog"], tokenizer=tokenizer)
    report = evaluate_edit(model, dataset, image_processor=processor, tokenizer=tokenizer)
    report.before.forget_accuracy, report.after.forget_accuracy, report.to_dict()
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..api import holds_forget_adapters, load_from_model_checkpoint, resolve_tokenizer
from ..core import class_text_embeddings, resolve_templates, validate_class_names
from ..hub import ForgetEvaluation
from .data import AUTO, check_labelled_images
from .metric import load_forgetting_metric


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
    """The outermost module named ``visual_projection`` of ``model`` (a forget layer when the model holds
    adapters on it, else the plain ``nn.Linear``)."""
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if name == PROJECTION_NAME or name.endswith("." + PROJECTION_NAME)
    ]
    if not matches:
        raise ValueError(
            f"{type(model).__name__} has no `{PROJECTION_NAME}` layer, so it is not a CLIP-style dual encoder. Use a "
            "CLIPModel or VisionTextDualEncoderModel (or a model whose `get_image_features` applies a "
            f"`{PROJECTION_NAME}` layer to the vision tower's pooled output)."
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

    The work is spread over the processes of an ``accelerate launch`` run: each process embeds its shard of the
    batches (the loader is sharded by ``accelerate``) and the features are gathered, so every process ends up with
    all of them, in dataset order. A plain run is one process. The model is moved to the process's device (as
    ``accelerator.prepare`` would), unless it is dispatched over several devices (``device_map``).

    Args:
        model: a dual encoder (``CLIPModel``, ``VisionTextDualEncoderModel``, or a forget ``PeftModel`` of one).
        dataset: labelled images (see :func:`hf_clip_forget.evaluation.load_labelled_images`).
        image_processor: the model's image processor (``AutoImageProcessor`` / ``CLIPProcessor``), or any callable
            ``list of images -> {"pixel_values": (b, c, h, w) tensor}`` (or the tensor itself).
        image_column, label_column, domain_column: see :func:`hf_clip_forget.evaluation.resolve_columns`.
        batch_size: images per forward pass (per process).
        num_workers: ``DataLoader`` workers decoding and preprocessing images.
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``) giving the device and the processes; by
            default ``accelerate.PartialState()``, which leaves the mixed-precision settings of an ``Accelerator``
            you create later free.
        show_progress: show a progress bar (on the main process).

    Returns:
        :class:`ImageFeatures`, in dataset order.
    """
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import gather
    from torch.utils.data import DataLoader

    columns = check_labelled_images(dataset, image_column, label_column, domain_column)
    if not callable(image_processor):
        raise TypeError(
            f"`image_processor` must be callable (an image processor, or images -> pixel values), got "
            f"{type(image_processor).__name__}. Load the model's with `AutoImageProcessor.from_pretrained(...)`."
        )
    find_visual_projection(model)  # fail before any image is decoded
    state = accelerator if accelerator is not None else PartialState()
    _place(model, state.device)
    labels, class_names, domains, domain_names = _labels_and_domains(dataset, columns)

    loader = DataLoader(
        list(range(len(dataset))),
        batch_size=batch_size,
        collate_fn=_ImageBatches(dataset, columns.image, image_processor),
        num_workers=num_workers,
    )
    if state.num_processes > 1:
        # even batches: a shard that runs short repeats images, whose duplicates the index scatter below absorbs
        loader = prepare_data_loader(loader, num_processes=state.num_processes, process_index=state.process_index)
    indices, features = [], []
    progress = tqdm(
        loader, desc="Embedding images", unit="batch", disable=not show_progress or not state.is_main_process
    )
    for batch_indices, pixel_values in progress:
        pooled = pre_projection_features(model, pixel_values).float()
        batch_indices, pooled = gather((batch_indices.to(pooled.device), pooled.contiguous()))
        indices.append(batch_indices.cpu())
        features.append(pooled.cpu())
    indices_t, features_t = torch.cat(indices), torch.cat(features)
    ordered = features_t.new_empty(len(dataset), features_t.shape[1])
    ordered[indices_t] = features_t  # dataset order; a repeated index (padding of uneven shards) writes twice
    if torch.unique(indices_t).numel() != len(dataset):
        raise RuntimeError("Some images were not embedded: the gathered batches do not cover the dataset.")
    return ImageFeatures(ordered, labels, class_names, domains, domain_names)


# ------------------------------------------------------------------------------------------------------ text side
@torch.no_grad()
def class_embeddings(
    model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: str | Sequence[str] | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> Tensor:
    """L2-normalised, template-averaged text embeddings ``(len(class_names), d)`` (float32, CPU) of the classes,
    computed with ``model`` as it is now (an adapter on ``text_projection`` changes them)."""
    names = validate_class_names(class_names, "class_names")
    return class_text_embeddings(
        model, tokenizer, names, resolve_templates(templates), True, batch_size, show_progress
    ).embeddings.float()


def zero_shot_logits(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine similarities ``(n_images, n_classes)`` (float32) of image and class embeddings."""
    image = nn.functional.normalize(image_embeds.float(), dim=-1)
    text = nn.functional.normalize(text_embeds.float(), dim=-1)
    return image @ text.T


# -------------------------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class ZeroShotReport:
    """Zero-shot accuracies of one model on one labelled image set (fractions in [0, 1]).

    Attributes:
        accuracy: over all images.
        forget_accuracy: over the images of the forgotten classes (``None`` without forget classes).
        retain_accuracy: over the other images (``None`` without forget classes, or if there are no others).
        per_class: class name → accuracy over its images (classes with images only, in label order).
        per_domain_class: ``"<domain>/<class>"`` → accuracy (only when the dataset has a domain column).
        num_images: how many images were classified.
        forget_classes: the forgotten classes.
    """

    accuracy: float
    forget_accuracy: float | None
    retain_accuracy: float | None
    per_class: dict[str, float]
    per_domain_class: dict[str, float] | None
    num_images: int
    forget_classes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``per_domain_class`` only when there are domains."""
        result = {
            "accuracy": self.accuracy,
            "forget_accuracy": self.forget_accuracy,
            "retain_accuracy": self.retain_accuracy,
            "per_class": dict(self.per_class),
            "num_images": self.num_images,
            "forget_classes": list(self.forget_classes),
        }
        if self.per_domain_class is not None:
            result["per_domain_class"] = dict(self.per_domain_class)
        return result


@dataclass(frozen=True)
class ForgettingReport:
    """Zero-shot accuracies of a model before and after a forget edit, on the same images."""

    before: ZeroShotReport
    after: ZeroShotReport

    def to_dict(self) -> dict[str, Any]:
        """``{"before": {...}, "after": {...}}``, each as :meth:`ZeroShotReport.to_dict`."""
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}

    def to_forget_evaluation(
        self, dataset_name: str, dataset_type: str | None = None, split: str = "test"
    ) -> ForgetEvaluation:
        """The report as a :class:`hf_clip_forget.hub.ForgetEvaluation`, for model cards (``write_model_card``,
        ``push_to_hub(evaluations=...)``).

        Args:
            dataset_name: the dataset's display name, e.g. ``"PACS"``.
            dataset_type: its Hub id (the ``model-index`` dataset type); defaults to ``dataset_name``.
            split: the split evaluated.
        """
        values = {
            "forget_accuracy_before": self.before.forget_accuracy,
            "forget_accuracy_after": self.after.forget_accuracy,
            "retain_accuracy_before": self.before.retain_accuracy,
            "retain_accuracy_after": self.after.retain_accuracy,
        }
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise ValueError(
                f"A model-card evaluation needs forget and retain accuracies, but {missing} are undefined: evaluate "
                "with `forget_classes` that leave images of other classes in the dataset."
            )
        return ForgetEvaluation(
            dataset_name=dataset_name, dataset_type=dataset_type or dataset_name, split=split, **values
        )


def _group_accuracies(correct: Tensor, groups: Tensor, names: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(groups, minlength=len(names))
    hits = torch.bincount(groups, weights=correct.double(), minlength=len(names))
    return {names[i]: float(hits[i] / counts[i]) for i in range(len(names)) if counts[i] > 0}


def score_predictions(
    predictions: Tensor, features: ImageFeatures, forget_classes: Sequence[str] = (), metric=None
) -> ZeroShotReport:
    """The :class:`ZeroShotReport` of ``predictions`` (``(n,)`` class indices) against ``features``' labels.

    Accuracy, forget and retain accuracy come from the ``forgetting_accuracy`` metric (``metric``, or a freshly
    loaded one); per-class and per-domain accuracies are counted here.
    """
    predictions = predictions.cpu().long()
    if predictions.shape != features.labels.shape:
        raise ValueError(f"Got {predictions.shape[0]} predictions for {len(features)} images.")
    forget_ids = [features.class_names.index(name) for name in forget_classes]
    metric = metric if metric is not None else load_forgetting_metric()
    scores = metric.compute(
        predictions=predictions.tolist(), references=features.labels.tolist(), forget_labels=forget_ids
    )
    correct = predictions == features.labels
    per_domain_class = None
    if features.domains is not None:
        num_classes = len(features.class_names)
        names = [f"{domain}/{name}" for domain in features.domain_names for name in features.class_names]
        per_domain_class = _group_accuracies(correct, features.domains * num_classes + features.labels, names)
    return ZeroShotReport(
        accuracy=scores["accuracy"],
        forget_accuracy=scores["forget_accuracy"],
        retain_accuracy=scores["retain_accuracy"],
        per_class=_group_accuracies(correct, features.labels, features.class_names),
        per_domain_class=per_domain_class,
        num_images=len(features),
        forget_classes=tuple(forget_classes),
    )


# --------------------------------------------------------------------------------------------------- entry points
def _check_forget_classes(forget_classes: Sequence[str] | None, features: ImageFeatures) -> tuple[str, ...]:
    if forget_classes is None:
        return ()
    names = validate_class_names(forget_classes, "forget_classes")
    unknown = [name for name in names if name not in features.class_names]
    if unknown:
        raise ValueError(
            f"Forget classes {unknown} are not classes of the dataset. Its classes are {list(features.class_names)}; "
            "pass forget classes by these names."
        )
    counts = torch.bincount(features.labels, minlength=len(features.class_names))
    empty = [name for name in names if counts[features.class_names.index(name)] == 0]
    if empty:
        raise ValueError(
            f"The dataset has no images of the forget classes {empty}, so their accuracy cannot be measured. "
            "Evaluate on a split that has images of them, or leave them out of `forget_classes`."
        )
    return tuple(names)


def _prompt_names(class_names: Sequence[str], class_prompts: Mapping[str, str] | None) -> list[str]:
    if not class_prompts:
        return list(class_names)
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ValueError(f"`class_prompts` names {unknown}, which are not classes of the dataset {list(class_names)}.")
    return [class_prompts.get(name, name) for name in class_names]


def _image_features(
    model: nn.Module,
    data: datasets.Dataset | ImageFeatures,
    image_processor: Callable | None,
    embed_options: dict[str, Any],
) -> ImageFeatures:
    if isinstance(data, ImageFeatures):
        if len(data) == 0:
            raise ValueError("The image features are empty: there are no images to evaluate.")
        return data
    if image_processor is None:
        image_processor = _load_image_processor(model)
    return embed_images(model, data, image_processor, **embed_options)


def _load_image_processor(model: nn.Module) -> Callable:
    from transformers import AutoImageProcessor

    return load_from_model_checkpoint(model, AutoImageProcessor, "image_processor")


def _classify(
    model: nn.Module,
    tokenizer,
    features: ImageFeatures,
    forget_classes: tuple[str, ...],
    prompt_names: list[str],
    templates: list[str],
    text_batch_size: int,
    show_progress: bool,
    metric,
) -> ZeroShotReport:
    """Classify the cached images with ``model`` as it is now (its edits active or bypassed) and score them."""
    model = model.get_base_model() if holds_forget_adapters(model) else model  # the adapters live inside it
    unique = list(dict.fromkeys(prompt_names))  # classes may share a prompt name (``class_prompts``)
    text = class_embeddings(model, tokenizer, unique, templates, text_batch_size, show_progress)
    text = text[[unique.index(name) for name in prompt_names]]
    logits = zero_shot_logits(project_image_features(model, features), text)
    return score_predictions(logits.argmax(dim=-1), features, forget_classes, metric)


def evaluate_zero_shot(
    model: nn.Module,
    data: datasets.Dataset | ImageFeatures,
    forget_classes: Sequence[str] | None = None,
    *,
    tokenizer=None,
    image_processor: Callable | None = None,
    templates: str | Sequence[str] | None = None,
    class_prompts: Mapping[str, str] | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
    accelerator=None,
    show_progress: bool = True,
) -> ZeroShotReport:
    """Zero-shot accuracy of ``model`` as it is (adapters active) on a labelled image set.

    Args:
        model: a dual encoder, with or without forget adapters.
        data: a labelled ``datasets.Dataset`` (see :func:`~hf_clip_forget.evaluation.load_labelled_images`), or
            :class:`ImageFeatures` already computed by :func:`embed_images` with the same vision tower.
        forget_classes: dataset classes whose images are scored as the "forget" group (the rest as "retain").
            Every class of the dataset remains a candidate prediction.
        tokenizer: the model's tokenizer (loaded from the model's ``name_or_path`` if omitted).
        image_processor: see :func:`embed_images` (loaded from the model's ``name_or_path`` if omitted).
        templates: prompt templates, as in :func:`hf_clip_forget.add_forget_adapter` (default: the 80 ImageNet
            templates, averaged per class).
        class_prompts: dataset class name → the text put into the templates for it (e.g. ``{"car_side": "car"}``;
            several classes may share one). Classes not named keep their label name.
        batch_size, num_workers, image_column, label_column, domain_column, accelerator, show_progress: see
            :func:`embed_images`.
        text_batch_size: prompts per text-tower batch.
    """
    features = _image_features(
        model,
        data,
        image_processor,
        dict(
            image_column=image_column,
            label_column=label_column,
            domain_column=domain_column,
            batch_size=batch_size,
            num_workers=num_workers,
            accelerator=accelerator,
            show_progress=show_progress,
        ),
    )
    forget = _check_forget_classes(forget_classes, features)
    base = model.get_base_model() if holds_forget_adapters(model) else model
    tokenizer = resolve_tokenizer(base, tokenizer)
    prompts = _prompt_names(features.class_names, class_prompts)
    templates = resolve_templates(templates)
    metric = load_forgetting_metric()
    return _classify(model, tokenizer, features, forget, prompts, templates, text_batch_size, show_progress, metric)


def _default_forget_classes(model: nn.Module, class_names: Sequence[str], class_prompts) -> list[str]:
    """The classes the active adapters of ``model`` forget, as dataset class names."""
    active = [name for name in model.active_adapters if name in model.peft_config]
    forgotten = list(dict.fromkeys(c for name in active for c in model.peft_config[name].forgotten_classes))
    by_prompt = {
        prompt: name for name, prompt in zip(class_names, _prompt_names(class_names, class_prompts), strict=True)
    }
    resolved = [name if name in class_names else by_prompt.get(name) for name in forgotten]
    missing = [name for name, found in zip(forgotten, resolved, strict=True) if found is None]
    if missing:
        raise ValueError(
            f"The active adapters forget {missing}, which are not classes of the dataset {list(class_names)}. Pass "
            "`forget_classes=` with the dataset classes to score as forgotten (or `class_prompts=` mapping dataset "
            "classes to the names the adapters forgot)."
        )
    return resolved


def evaluate_edit(
    model: nn.Module,
    data: datasets.Dataset | ImageFeatures,
    forget_classes: Sequence[str] | None = None,
    *,
    tokenizer=None,
    image_processor: Callable | None = None,
    reference_model: nn.Module | None = None,
    templates: str | Sequence[str] | None = None,
    class_prompts: Mapping[str, str] | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = AUTO,
    accelerator=None,
    show_progress: bool = True,
) -> ForgettingReport:
    """Zero-shot accuracies before and after a forget edit, in one call that embeds the images only once.

    "After" is ``model`` as it is (its active adapters applied, merged or not). "Before" is, by default, the same
    model with every forget edit bypassed (``model.base_model.edits_bypassed()``); with ``reference_model`` it is
    that model instead — the unedited original of a merged or otherwise separately edited ``model``, which must
    share its vision tower (checked on a few images): only the projection layers may differ.

    Args:
        model: a :class:`~hf_clip_forget.ForgetPeftModel` (or a peft ``PeftModel`` of forget adapters), or, with
            ``reference_model``, any dual encoder.
        data: a labelled ``datasets.Dataset``, or :class:`ImageFeatures` from :func:`embed_images`.
        forget_classes: the dataset classes scored as forgotten; by default the classes the active adapters forget
            (each must be a class of the dataset, by name or through ``class_prompts``).
        reference_model: the unedited model, when ``model`` is not a forget ``PeftModel``.
        tokenizer, image_processor, templates, class_prompts, batch_size, text_batch_size, num_workers,
            image_column, label_column, domain_column, accelerator, show_progress: as in
            :func:`evaluate_zero_shot`.

    Returns:
        A :class:`ForgettingReport`; ``report.to_dict()`` is ``{"before": {...}, "after": {...}}``.
    """
    adapters = holds_forget_adapters(model)
    if reference_model is None and not adapters:
        raise ValueError(
            f"{type(model).__name__} holds no forget adapter, so there is no edit to bypass for the 'before' "
            "numbers. Pass a model returned by `add_forget_adapter` (or loaded with `ForgetPeftModel."
            "from_pretrained`), or the unedited model as `reference_model=`."
        )
    features = _image_features(
        model,
        data,
        image_processor,
        dict(
            image_column=image_column,
            label_column=label_column,
            domain_column=domain_column,
            batch_size=batch_size,
            num_workers=num_workers,
            accelerator=accelerator,
            show_progress=show_progress,
        ),
    )
    if reference_model is not None:
        if not isinstance(data, ImageFeatures):
            _check_same_vision_tower(model, reference_model, data, image_processor, image_column, label_column)
        elif _model_device(reference_model) != _model_device(model):
            reference_model.to(_model_device(model))
    if forget_classes is None and adapters:
        forget_classes = _default_forget_classes(model, features.class_names, class_prompts)
    if forget_classes is None:
        raise ValueError("Pass `forget_classes=`: the dataset classes the edit forgets.")
    forget = _check_forget_classes(forget_classes, features)
    base = model.get_base_model() if adapters else model
    tokenizer = resolve_tokenizer(base, tokenizer)
    prompts = _prompt_names(features.class_names, class_prompts)
    templates = resolve_templates(templates)
    metric = load_forgetting_metric()

    def classify(target: nn.Module) -> ZeroShotReport:
        return _classify(
            target, tokenizer, features, forget, prompts, templates, text_batch_size, show_progress, metric
        )

    if reference_model is not None:
        before = classify(reference_model)
    else:
        with model.base_model.edits_bypassed():
            before = classify(model)
    return ForgettingReport(before=before, after=classify(model))


def _check_same_vision_tower(
    model: nn.Module,
    reference_model: nn.Module,
    dataset: datasets.Dataset,
    image_processor: Callable | None,
    image_column: str | None,
    label_column: str | None,
    num_images: int = 4,
) -> None:
    if image_processor is None:
        image_processor = _load_image_processor(model)
    columns = check_labelled_images(dataset, image_column, label_column, None)
    _place(reference_model, _model_device(model))
    _, pixel_values = _ImageBatches(dataset, columns.image, image_processor)(
        list(range(min(num_images, len(dataset))))
    )
    ours = pre_projection_features(model, pixel_values).float()
    theirs = pre_projection_features(reference_model, pixel_values).float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * ours.abs().max().item()):
        raise ValueError(
            "`reference_model` and `model` have different vision towers (their features before `visual_projection` "
            "differ), so one cannot stand for the other before the edit. Pass the unedited original of `model` as "
            "`reference_model`, or evaluate a forget PeftModel alone."
        )
