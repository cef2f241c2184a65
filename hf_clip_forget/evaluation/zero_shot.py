"""Zero-shot classification of a labelled image set by a dual encoder, before and after a forget edit.

The images are embedded once (:class:`ImageFeatures`: per image, the input of the family's image-side layer, or
for an output-edit family such as SigLIP its unedited embedding), and every version of the model — unedited, edited,
merged, or with adapters bypassed — gets its image embeddings from those features as it is now
(:func:`project_image_features`), equal to what the family's image embedding function computes from the images
(:mod:`hf_clip_forget.evaluation.representation` says why).

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch
from torch import Tensor, nn

from ..api import holds_forget_adapters, load_from_model_checkpoint, resolve_tokenizer
from ..core import class_text_embeddings, resolve_templates, validate_class_names
from .data import AUTO, check_labelled_images
from .features import _place, embed_images, image_batches
from .metric import load_forgetting_metric
from .reports import ForgettingReport, ZeroShotReport, score_predictions
from .representation import (
    ImageFeatures,
    _model_device,
    image_representation,
    pre_projection_features,
    project_image_features,
)


# ------------------------------------------------------------------------------------------------------ text side
@torch.no_grad()
def class_embeddings(
    model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: str | Sequence[str] | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
) -> Tensor:
    """L2-normalised, template-averaged text embeddings ``(len(class_names), d)`` (float32, CPU) of the classes,
    computed with ``model`` as it is now (an adapter on ``text_projection`` changes them); ``use_cache``: take the
    unedited prompt embeddings from the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``)."""
    names = validate_class_names(class_names, "class_names")
    return class_text_embeddings(
        model, tokenizer, names, resolve_templates(templates), True, batch_size, show_progress, use_cache
    ).embeddings.float()


def zero_shot_logits(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine similarities ``(n_images, n_classes)`` (float32) of image and class embeddings."""
    image = nn.functional.normalize(image_embeds.float(), dim=-1)
    text = nn.functional.normalize(text_embeds.float(), dim=-1)
    return image @ text.T


# --------------------------------------------------------------------------------------------------- entry points
def _check_forget_classes(forget_classes: Sequence[str] | None, features: ImageFeatures) -> tuple[str, ...]:
    if forget_classes is None:
        return ()
    names = validate_class_names(forget_classes, "forget_classes")
    position = {name: i for i, name in enumerate(features.class_names)}  # one pass: no scan per name
    unknown = [name for name in names if name not in position]
    if unknown:
        raise ValueError(
            f"Forget classes {unknown} are not classes of the dataset. Its classes are {list(features.class_names)}; "
            "pass forget classes by these names."
        )
    counts = torch.bincount(features.labels, minlength=len(features.class_names))
    empty = [name for name in names if counts[position[name]] == 0]
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
    use_cache: bool = True,
) -> ZeroShotReport:
    """Classify the cached images with ``model`` as it is now (its edits active or bypassed) and score them."""
    model = model.get_base_model() if holds_forget_adapters(model) else model  # the adapters live inside it
    position = {name: i for i, name in enumerate(dict.fromkeys(prompt_names))}  # classes may share a prompt name
    text = class_embeddings(model, tokenizer, list(position), templates, text_batch_size, show_progress, use_cache)
    if len(position) < len(prompt_names):
        text = text[torch.tensor([position[name] for name in prompt_names], dtype=torch.long)]
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
    use_cache: bool = True,
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
        use_cache: take the class prompts' unedited embeddings from the prompt-embedding cache
            (``hf_clip_forget.core.prompt_cache``); ``False`` encodes them anew.
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
    return _classify(
        model, tokenizer, features, forget, prompts, templates, text_batch_size, show_progress, metric, use_cache
    )


def _default_forget_classes(model: nn.Module, class_names: Sequence[str], class_prompts) -> list[str]:
    """The classes the active adapters of ``model`` forget, as dataset class names."""
    active = [name for name in model.active_adapters if name in model.peft_config]
    forgotten = list(dict.fromkeys(c for name in active for c in model.peft_config[name].forgotten_classes))
    by_prompt = {
        prompt: name for name, prompt in zip(class_names, _prompt_names(class_names, class_prompts), strict=True)
    }
    known = set(class_names)
    resolved = [name if name in known else by_prompt.get(name) for name in forgotten]
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
    use_cache: bool = True,
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
            image_column, label_column, domain_column, accelerator, show_progress, use_cache: as in
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
            target, tokenizer, features, forget, prompts, templates, text_batch_size, show_progress, metric, use_cache
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
    _, inputs = image_batches(model, dataset, columns.image, image_processor)(
        list(range(min(num_images, len(dataset))))
    )
    ours = pre_projection_features(model, **inputs).float()
    theirs = pre_projection_features(reference_model, **inputs).float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * ours.abs().max().item()):
        raise ValueError(
            "`reference_model` and `model` have different vision towers (their cached image features, the "
            f"{image_representation(model)}, differ), so one cannot stand for the other before the edit. Pass the unedited original of `model` as "
            "`reference_model`, or evaluate a forget PeftModel alone."
        )
