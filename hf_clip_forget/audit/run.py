"""``audit_forgetting``: try to get the forgotten classes back, and say how far each attempt got."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import datasets
from torch import nn

from ..api import resolve_tokenizer
from ..core import find_neighbours, vocabulary_words
from ..evaluation import ImageFeatures, embed_images, project_image_features
from ..evaluation.zero_shot import _load_image_processor, _prompt_names
from ..tuners.projection_edit.neighbours import naming_template
from .image_probes import image_rows, image_set
from .report import AuditReport
from .setup import AuditSetup, EmbeddingSpace, edit_setup
from .text_probes import held_out_prompt_rows, margin_rows, neighbour_rows


def audit_forgetting(
    model: nn.Module,
    tokenizer=None,
    *,
    neighbours: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    vocabulary_neighbours: int = 5,
    vocabulary: Sequence[str] | None = None,
    vocabulary_size: int = 4000,
    descriptions: Mapping[str, Sequence[str]] | None = None,
    candidate_classes: Sequence[str] | None = None,
    held_out_templates: str | Sequence[str] | None = None,
    data: datasets.Dataset | ImageFeatures | None = None,
    image_processor: Callable | None = None,
    class_prompts: Mapping[str, str] | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
) -> AuditReport:
    """Probe whether the classes a forget adapter removed can be recovered, before and after the edit.

    Data-free probes always run: the forgotten class under held-out prompt templates (and ``descriptions``), under
    neighbour names (``neighbours`` plus the ``vocabulary_neighbours`` nearest words of the vocabulary), and its
    logit margin over the other classes. With ``data`` (labelled images), also: zero-shot accuracy with the
    neighbours among the candidates and with held-out prompts, image→text rank and text→image R-precision, and a
    linear probe on the edited embeddings and on the untouched tower features.

    Args:
        model: a forget ``PeftModel`` (``add_forget_adapter``, ``ForgetPeftModel.from_pretrained``); its active
            adapters are audited, "before" is the same model with the edits bypassed.
        tokenizer: the model's tokenizer (loaded from the checkpoint if omitted).
        neighbours: other names to try, for every forgotten class (a list) or per class (a mapping).
        vocabulary_neighbours: nearest whole words of the vocabulary to add per class (0: none).
        vocabulary: the words to search instead of the tokenizer's vocabulary (a word list).
        vocabulary_size: how many vocabulary words to search (the first ones by token id).
        descriptions: forgotten class → free-form descriptions to try ("a small furry pet that barks").
        candidate_classes: further class names a forgotten class must beat in the data-free probes (the adapters'
            retain classes are always candidates).
        held_out_templates: templates not used to build the edit (default: ``HELD_OUT_TEMPLATES``, minus any the
            adapters used).
        data: a labelled image set (``datasets.Dataset``) or its cached :class:`ImageFeatures`.
        image_processor, class_prompts, batch_size, text_batch_size, show_progress: as in
            :func:`hf_clip_forget.evaluation.evaluate_edit`.
        use_cache: take prompt embeddings from the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``);
            ``False`` encodes every prompt anew.

    Returns:
        an :class:`AuditReport` (``print`` it, ``.to_dict()``, ``.save(path)``, ``.plot(path)``).
    """
    started = time.perf_counter()
    setup = edit_setup(model, candidate_classes, held_out_templates, descriptions)
    given = _per_class(neighbours, setup.forgotten)
    check_neighbours(given, setup.candidates)
    if vocabulary_neighbours < 0:
        raise ValueError(f"`vocabulary_neighbours` must be >= 0, got {vocabulary_neighbours}.")
    if vocabulary_neighbours and vocabulary is not None and not list(vocabulary):
        raise ValueError("`vocabulary` is empty: pass words to search, or `vocabulary_neighbours=0`.")
    tokenizer = resolve_tokenizer(model.get_base_model(), tokenizer)
    space = EmbeddingSpace(model, tokenizer, setup.adapters, text_batch_size, show_progress, use_cache)
    images = None
    if data is not None:
        images = _embedded_images(model, data, image_processor, class_prompts, batch_size, show_progress)
    setup = _with_neighbours(setup, space, tokenizer, given, vocabulary_neighbours, vocabulary, vocabulary_size)
    rows = held_out_prompt_rows(space, setup) + neighbour_rows(space, setup) + margin_rows(space, setup)
    if images is not None:
        rows += image_rows(space, setup, images)
    return AuditReport(
        rows=tuple(rows),
        forgotten_classes=setup.forgotten,
        adapters=setup.adapters,
        candidate_classes=setup.candidates,
        data=None if images is None else f"{len(images.features)} labelled images",
        seconds=time.perf_counter() - started,
    )


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def check_neighbours(neighbours: Mapping[str, Sequence[str]], named_classes: Sequence[str]) -> None:
    """Refuse neighbour names that are themselves a forgotten or retained class (they would test nothing)."""
    for forgotten, names in neighbours.items():
        clashes = sorted({n for n in names for c in named_classes if _same_name(n, c)})
        if clashes:
            raise ValueError(
                f"Neighbour names {clashes} of {forgotten!r} are classes of the edit themselves (forgotten or kept); "
                "a neighbour must be another name for the class. Remove them from `neighbours`."
            )
        blank = [n for n in names if not isinstance(n, str) or not n.strip()]
        if blank:
            raise ValueError(f"Neighbour names of {forgotten!r} must be non-empty strings, got {blank!r}.")


def _per_class(neighbours, forgotten: Sequence[str]) -> dict[str, tuple[str, ...]]:
    if neighbours is None:
        return {name: () for name in forgotten}
    if isinstance(neighbours, str):
        raise TypeError("`neighbours` must be a list of names or a mapping class → names, not one string.")
    if isinstance(neighbours, Mapping):
        unknown = sorted(set(neighbours) - set(forgotten))
        if unknown:
            raise ValueError(f"`neighbours` names {unknown}, which the adapters do not forget ({list(forgotten)}).")
        return {name: tuple(neighbours.get(name, ())) for name in forgotten}
    return {name: tuple(neighbours) for name in forgotten}


def _with_neighbours(
    setup: AuditSetup, space, tokenizer, given: Mapping[str, tuple], count: int, vocabulary, vocabulary_size: int
) -> AuditSetup:
    """``setup`` with the user's neighbour names (``given``, checked) and the nearest vocabulary words of each
    forgotten class."""
    found = {name: () for name in setup.forgotten}
    if count:
        words = list(vocabulary) if vocabulary is not None else vocabulary_words(tokenizer, vocabulary_size)
        nearest = find_neighbours(
            lambda prompts: space.prompts(prompts, edited=False),
            setup.forgotten,
            setup.candidates,
            words,
            count,
            naming_template(space.base),
            exclude=[n for names in given.values() for n in names],
        )
        found = {name: tuple(word for word, _ in pairs) for name, pairs in nearest.items()}
    merged = {name: tuple(dict.fromkeys([*given[name], *found[name]])) for name in setup.forgotten}
    return dataclasses.replace(setup, neighbours=merged)


def _embedded_images(model, data, image_processor, class_prompts, batch_size: int, show_progress: bool):
    base = model.get_base_model()
    if isinstance(data, ImageFeatures):
        features = data
    else:
        processor = image_processor if image_processor is not None else _load_image_processor(base)
        features = embed_images(base, data, processor, batch_size=batch_size, show_progress=show_progress)
    if len(features) == 0:
        raise ValueError("The data holds no images: pass a labelled image set, or no data for a data-free audit.")
    with model.base_model.edits_bypassed():
        before = project_image_features(base, features)
    after = project_image_features(base, features)
    return image_set(features, before, after, _prompt_names(features.class_names, class_prompts))


__all__ = ["audit_forgetting"]
