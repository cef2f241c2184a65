"""Text embeddings of class names, computed with the dual encoder's own text tower.

The model is used only through its family's text embedding function (:mod:`.joint_embeddings`:
``get_text_features`` for most families), so this module does not depend on peft. Every prompt is encoded by
:func:`encode_prompts`, through the prompt-embedding cache (:mod:`.prompt_cache`) unless ``use_cache=False``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..families import find_family
from .joint_embeddings import embedding_function
from .prompt_cache import cached_embeddings, prompt_cache_enabled, tokenizer_key
from .subspace import normalize_rows
from .text_path import edits_bypassed, text_path, text_path_fingerprint, text_path_in_training, text_side_edits


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
    duplicates = duplicate_names(names)
    if duplicates:
        raise ValueError(f"`{argument}` contains duplicates {duplicates}; list each class once.")
    return names


def duplicate_names(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted: one counting pass, linear in the number of names."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


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


def _padding(model):
    """How prompts are padded for ``model``'s text tower: ``True`` (to the longest prompt of each batch) or the
    family's ``"max_length"``, as its text tower was trained."""
    family = find_family(model)
    return True if family is None or family.text_padding == "longest" else family.text_padding


@dataclass(frozen=True)
class _Tokenization:
    """``tokenize(prompts) -> inputs`` on the model's device, as every encoding tokenises: one place, so that the
    cache key records the padding settings actually used."""

    tokenizer: object
    padding: bool | str
    max_length: int | None
    vocab_size: int | None
    device: torch.device

    @classmethod
    def of(cls, model, tokenizer) -> _Tokenization:
        vocab_size = getattr(getattr(model.config, "text_config", None), "vocab_size", None)
        device = next(model.parameters()).device
        return cls(tokenizer, _padding(model), _max_text_length(model, tokenizer), vocab_size, device)

    @property
    def settings(self) -> dict:
        return {"padding": self.padding, "max_length": self.max_length, "truncation": self.max_length is not None}

    def lengths(self, prompts: list[str], chunk: int = 4096) -> list[int]:
        """The number of tokens of each prompt (after truncation), without padding; tokenised ``chunk`` prompts at a
        time, so that what a tokenizer returns per prompt (ids, and a fast tokenizer's encodings with their tokens
        and offsets) is held for one chunk, not for every prompt at once."""
        lengths = []
        for start in range(0, len(prompts), chunk):
            encoded = self.tokenizer(
                prompts[start : start + chunk],
                padding=False,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            )
            lengths.extend(len(ids) for ids in encoded["input_ids"])
        return lengths

    def __call__(self, batch: list[str]) -> dict:
        inputs = self.tokenizer(
            batch,
            padding=self.padding,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        if self.vocab_size is not None and int(inputs["input_ids"].max()) >= self.vocab_size:
            raise ValueError(
                f"The tokenizer produced token id {int(inputs['input_ids'].max())}, but the model's text tower embeds "
                f"only {self.vocab_size} tokens: use the tokenizer that belongs to this model."
            )
        return {key: value.to(self.device) for key, value in inputs.items()}


def _length_sorted_batches(tokenize: _Tokenization, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` cut into batches of similar token length (shortest first), so that padding to the
    longest prompt of a batch pads little. With fixed-length padding (SigLIP's ``"max_length"``) order is kept."""
    order = list(range(len(prompts)))
    if tokenize.padding is True and len(prompts) > batch_size:
        lengths = tokenize.lengths(prompts)
        order.sort(key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _encode(model, tokenize: _Tokenization, prompts: Sequence[str], batch_size: int, show_progress: bool) -> Tensor:
    """The text side's outputs for ``prompts`` as ``model`` is now (float32, CPU).

    Each distinct prompt is encoded once, in batches of similar token length (less padding to compute), under
    ``torch.inference_mode``; each batch is copied into one ordinary tensor (usable with autograd) at its prompts'
    rows, which are then returned in the order of ``prompts``.
    """
    text_features = embedding_function(model, "text")
    position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
    unique = list(position)
    batches = _length_sorted_batches(tokenize, unique, batch_size)
    rows: Tensor | None = None
    progress = tqdm(batches, desc="Encoding prompts", disable=not show_progress or len(batches) < 2, leave=False)
    for batch in progress:
        with torch.inference_mode():
            output = text_features(**tokenize([unique[i] for i in batch])).float().cpu()
        if rows is None:
            rows = torch.empty(len(unique), *output.shape[1:], dtype=output.dtype)
        rows[torch.tensor(batch, dtype=torch.long)] = output
    if rows is None:
        return torch.empty(0)
    if len(unique) == len(prompts):  # no prompt repeated: already in their order
        return rows
    return rows.index_select(0, torch.tensor([position[prompt] for prompt in prompts], dtype=torch.long))


@torch.no_grad()
def encode_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
) -> Tensor:
    """Projected text features (unnormalised, ``(len(prompts), d)``, float32) of ``prompts``, in batches, as
    ``model`` computes them now (its active text-side forget edits included).

    With ``use_cache`` (and unless ``HF_CLIP_FORGET_PROMPT_CACHE=0``), the *unedited* embeddings come from the
    prompt cache (:mod:`.prompt_cache`), or are computed with every forget edit bypassed and stored there, and the
    current text-side edit is applied to them: the same embeddings up to rounding, without running the text
    tower on prompts it has seen. Raises a ``ValueError`` when the tokenizer does not fit the model's text tower.
    """
    check_tokenizer_fits(model, tokenizer)
    tokenize = _Tokenization.of(model, tokenizer)
    prompts = list(prompts)
    if prompts and prompt_cache_enabled(use_cache):
        cached = _encode_through_cache(model, tokenizer, tokenize, prompts, batch_size, show_progress)
        if cached is not None:
            return cached
    return _encode(model, tokenize, prompts, batch_size, show_progress)


def _encode_through_cache(model, tokenizer, tokenize, prompts, batch_size, show_progress) -> Tensor | None:
    """The unedited embeddings from the cache with the current text-side edit applied, or ``None`` when they
    cannot be keyed (see :mod:`.prompt_cache`: then the caller encodes directly)."""
    tokenizer_id = tokenizer_key(tokenizer)
    if tokenizer_id is None:
        return None
    path = text_path(model, tokenize)
    edits = text_side_edits(model)
    if text_path_in_training(model, path) or (edits and path.after_layer is None):  # dropout, batch statistics
        return None
    fingerprint = text_path_fingerprint(model, path)
    if fingerprint is None:
        return None
    parts = {"text_path": fingerprint, "tokenizer": tokenizer_id, "device": tokenize.device.type, **tokenize.settings}

    def compute(missing: list[str]) -> Tensor:
        with edits_bypassed(model):
            return _encode(model, tokenize, missing, batch_size, show_progress)

    embeddings = cached_embeddings(parts, prompts, compute)
    if not edits:
        return embeddings
    for edit in edits:
        embeddings = edit.apply(embeddings.to(edit.left.dtype))
    if path.after_layer == "normalize":
        embeddings = nn.functional.normalize(embeddings, dim=-1)
    return embeddings.to(_text_dtype(model)).float()


def _text_dtype(model) -> torch.dtype:
    """The dtype the text side computes in (its first floating parameter's): an edited embedding is rounded to it,
    as the edited layer's output is."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def average_templates(rows: Tensor) -> Tensor:
    """``(n, d)`` from ``(n, templates, d)`` unit rows: each name's template embeddings averaged and renormalised
    (CLIP's zero-shot ensemble). With one template, its rows as they are: the mean of one unit row renormalised is
    that row (up to rounding), and skipping it spares two copies of every row (20,000 names: ~35 ms)."""
    if rows.shape[1] == 1:
        return rows[:, 0]
    return normalize_rows(rows.mean(dim=1))


def class_text_embeddings(
    model,
    tokenizer,
    classes: Sequence[str],
    templates: Sequence[str],
    average: bool = True,
    batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
) -> ClassTextEmbeddings:
    """Embed every class name with every template and L2-normalise (see :class:`ClassTextEmbeddings`; ``use_cache``:
    see :func:`encode_prompts`)."""
    prompts = [template.format(name) for name in classes for template in templates]  # fill_templates, flat
    features = normalize_rows(encode_prompts(model, tokenizer, prompts, batch_size, show_progress, use_cache))
    per_class = features.reshape(len(classes), len(templates), -1)
    if average:
        return ClassTextEmbeddings(average_templates(per_class), tuple(classes), True)
    labels = tuple(name for name in classes for _ in templates)
    return ClassTextEmbeddings(features, labels, False)
