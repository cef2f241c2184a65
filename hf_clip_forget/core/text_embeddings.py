"""Text embeddings of class names, computed with the dual encoder's own text tower.

The model is used only through its family's text embedding function (:mod:`.joint_embeddings`:
``get_text_features`` for most families), so this module does not depend on peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..families import find_family
from .joint_embeddings import embedding_function
from .subspace import normalize_rows
from .templates import fill_templates


@dataclass(frozen=True)
class ClassTextEmbeddings:
    """L2-normalised text embeddings (float64, one row each) and the class each row belongs to.

    With ``averaged=True`` there is one row per class: the normalised mean of the class's normalised template
    embeddings (CLIP's zero-shot ensemble). Otherwise there is one row per (class, template).
    """

    embeddings: Tensor
    labels: tuple[str, ...]
    averaged: bool


def validate_class_names(classes: Sequence[str] | None, argument: str = "classes") -> list[str]:
    """Check a list of class names: non-empty, strings, non-blank, no duplicates. Returns it as a list."""
    if classes is None or isinstance(classes, (str, bytes)):
        hint = f" Did you mean [{classes!r}]?" if isinstance(classes, str) else ""
        raise TypeError(f"`{argument}` must be a list of class names, got {classes!r}.{hint}")
    names = list(classes)
    if not names:
        raise ValueError(f"`{argument}` is empty: give at least one class name.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"`{argument}` must contain only strings, got {name!r} of type {type(name).__name__}. "
                "Pass class names such as ['cat', 'dog'] (or precomputed vectors through `text_embeds`)."
            )
        if not name.strip():
            raise ValueError(f"`{argument}` contains a blank class name: {names!r}.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"`{argument}` contains duplicates {duplicates}; list each class once.")
    return names


def check_tokenizer_fits(model, tokenizer) -> None:
    """Raise a ``ValueError`` if ``tokenizer`` produces token ids that the model's text tower cannot embed."""
    vocab_size = getattr(getattr(model.config, "text_config", None), "vocab_size", None)
    if vocab_size is None:
        return
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's text tower embeds only {vocab_size}: it "
            "belongs to another model. Load the tokenizer saved with this checkpoint, e.g. "
            "`AutoTokenizer.from_pretrained(<same model id>)`."
        )


def _max_text_length(model, tokenizer) -> int | None:
    limits = [getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:  # transformers uses a huge sentinel for "unset"
        limits.append(model_max)
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


@torch.no_grad()
def encode_prompts(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 256, show_progress: bool = True
) -> Tensor:
    """Projected text features (unnormalised, ``(len(prompts), d)``, float32) of ``prompts``, in batches.

    Raises a ``ValueError`` when the tokenizer does not fit the model's text tower.
    """
    check_tokenizer_fits(model, tokenizer)
    device = next(model.parameters()).device
    text_features = embedding_function(model, "text")
    max_length = _max_text_length(model, tokenizer)
    family = find_family(model)
    # "longest" (pad each batch to its longest prompt) or "max_length", as the family's text tower was trained
    padding = True if family is None or family.text_padding == "longest" else family.text_padding
    vocab_size = getattr(getattr(model.config, "text_config", None), "vocab_size", None)
    batches = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="Encoding prompts", disable=not show_progress or len(starts) < 2, leave=False):
        batch = list(prompts[start : start + batch_size])
        inputs = tokenizer(
            batch, padding=padding, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        if vocab_size is not None and int(inputs["input_ids"].max()) >= vocab_size:
            raise ValueError(
                f"The tokenizer produced token id {int(inputs['input_ids'].max())}, but the model's text tower embeds "
                f"only {vocab_size} tokens: use the tokenizer that belongs to this model."
            )
        inputs = {key: value.to(device) for key, value in inputs.items()}
        batches.append(text_features(**inputs).float().cpu())
    return torch.cat(batches)


def class_text_embeddings(
    model,
    tokenizer,
    classes: Sequence[str],
    templates: Sequence[str],
    average: bool = True,
    batch_size: int = 256,
    show_progress: bool = True,
) -> ClassTextEmbeddings:
    """Embed every class name with every template and L2-normalise (see :class:`ClassTextEmbeddings`)."""
    prompts = [prompt for name in classes for prompt in fill_templates(name, templates)]
    features = normalize_rows(encode_prompts(model, tokenizer, prompts, batch_size, show_progress))
    per_class = features.reshape(len(classes), len(templates), -1)
    if average:
        return ClassTextEmbeddings(normalize_rows(per_class.mean(dim=1)), tuple(classes), True)
    labels = tuple(name for name in classes for _ in templates)
    return ClassTextEmbeddings(features, labels, False)
