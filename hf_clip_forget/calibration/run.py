"""``calibrate_forget_adapter``: choose an edit's strength on the user's labelled validation set for a stated budget,
and write the adapter with that strength, its config and card recording how it was chosen."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import datasets
import torch
from torch import Tensor, nn

from ..api import ForgetPeftModel, adapter_holder, add_forget_adapter, forget_config, resolve_tokenizer
from ..api.adding import _new_adapter_name
from ..core import describe_templates, resolve_templates
from ..core.calibration import CalibrationBudget, Candidate, choose_candidate, group_accuracies, masked_accuracy
from ..evaluation import (
    ImageFeatures,
    class_embeddings,
    embed_images,
    image_features_key,
    load_or_embed_image_features,
    project_image_features,
    zero_shot_logits,
)
from ..evaluation.zero_shot import _load_image_processor
from ..tuners.projection_edit.estimate import WeakEditWarning
from .data import CalibrationRequest, ValidationData, check_request, groups, kept_groups, read_validation_data
from .report import BeforeAfter, CalibrationReport, GroupAccuracy, ValidationSet
from .search import CalibrationSearch, search_strengths, set_strength


#: ``add_forget_adapter`` options a calibration does not take, and why.
REFUSED_OPTIONS = {
    "alpha": "α is what the calibration chooses; give the strengths to try as `search={'alphas': [...]}`",
    "ccup_mu": "μ is what the calibration chooses; give the strengths to try as `search={'mus': [...]}`",
    "text_embeds": "a calibration forgets classes of the validation data by name; pass `classes`",
    "retain_text_embeds": "the retain classes are the validation data's other classes (or `retain_classes`)",
}


class CalibrationResult(NamedTuple):
    """What :func:`calibrate_forget_adapter` returns: unpack it (``model, report = ...``) or use the fields.

    Attributes:
        model: the :class:`~hf_clip_forget.ForgetPeftModel` holding the new adapter at the chosen strength (as
            ``add_forget_adapter`` returns it: a new wrapper of the base model, or the one it already had).
        report: the :class:`~hf_clip_forget.calibration.CalibrationReport` (also recorded in the adapter's config).
    """

    model: ForgetPeftModel
    report: CalibrationReport


def calibrate_forget_adapter(
    model: nn.Module,
    classes: Sequence[str],
    tokenizer=None,
    *,
    data: datasets.Dataset | ImageFeatures,
    budget: CalibrationBudget | Mapping[str, float] | None = None,
    image_processor: Callable | None = None,
    domains: Sequence[str] | None = None,
    retain_domains: Sequence[str] | None = None,
    retain_classes: Sequence[str] | None = None,
    method: str | None = None,
    paradigm: str | None = None,
    search: CalibrationSearch | Mapping[str, Any] | None = None,
    eval_templates: str | Sequence[str] | None = None,
    adapter_name: str | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
    cache_features: bool = True,
    data_source: str | os.PathLike | None = None,
    **adapter_options,
) -> CalibrationResult:
    """Forget ``classes`` with the strength that best meets ``budget`` on a labelled validation set.

    The edit's *directions* are computed from the class names as by :func:`~hf_clip_forget.add_forget_adapter`
    (once; the adapter's factors do not depend on its strength); the validation set only chooses its *strength*:
    α for a nullspace edit, μ (and λ, with ``search={'lambdas': [...]}``) for CCUP. Every strength of the grid
    (:class:`CalibrationSearch`; refined around where the budget switches between met and not met) is set on the
    adapter itself and measured by zero-shot classification of the validation images among all of the data's
    classes, by the classifier ``hf-clip-forget eval`` uses (``eval_templates``; the 80-template ensemble by default,
    whatever templates the edit was built from), so that the numbers the card records are the ones a user checking
    the adapter will see. The image features are computed once (and reused from the image-feature
    cache with ``use_cache``); the class embeddings once, or for a text-side edit per strength through the
    prompt-embedding cache — no image or prompt is encoded again (with ``use_cache=False``, a text-side edit encodes
    its class prompts once per strength).

    The choice (:func:`~hf_clip_forget.core.calibration.choose_candidate`): among strengths meeting the budget, the
    least retain drop — drops not significantly larger (within 1.96 standard errors, paired over the kept images)
    count as equal — then the lowest forget accuracy, and of the strengths still tied the one in the middle of their
    range (furthest from both bounds); if none meets it, the lowest forget accuracy within the
    retain-drop budget, else the strength nearest to the budget — and the report says plainly "budget not met".

    Forget images: every image of a forgotten class (``paradigm="global"``), or of a forgotten class in ``domains``.
    Kept images: every image of a retain class, and with ``paradigm="domain"`` the forgotten classes in
    ``retain_domains``. The budget bounds the forget accuracy and the drop of the kept accuracy — for
    ``paradigm="domain"`` of the retain classes' images and of the forgotten classes in the kept domains *each*
    (pooled, the few images of the latter would hide their collapse).

    Visual prototypes: ``prototypes`` (an adapter option) is a fixed count, synthesised once with the adapter; it is
    not searched.

    Args:
        model: a dual encoder (or the ``ForgetPeftModel`` holding its adapters: the new one is stacked, and "before"
            is the model with its existing adapters).
        classes: classes to forget, named as in the validation data's ``ClassLabel``.
        tokenizer: the model's tokenizer (loaded from the model's checkpoint when omitted).
        data: the labelled validation set: a ``datasets.Dataset`` with an image column, a ``ClassLabel`` and
            optionally a ``domain`` column (``hf_clip_forget.evaluation.load_labelled_images``), or its
            :class:`~hf_clip_forget.evaluation.ImageFeatures`. Its images never leave this call: the adapter records
            its size and a sha256 hash.
        budget: a :class:`~hf_clip_forget.core.calibration.CalibrationBudget` or a dict with ``max_forget`` and
            ``max_retain_drop`` (fractions: 0.01 = 1 % / 1 point). Default: 0.01 and 0.01.
        image_processor: the model's image processor (loaded from the checkpoint when needed and omitted).
        domains, retain_domains, paradigm, method: as in ``add_forget_adapter``; domains must be in the data's
            domain column.
        retain_classes: the classes to keep (default: every other class of the data).
        search: the grid, a :class:`CalibrationSearch` or a dict of its fields (``alphas``, ``mus``, ``lambdas``,
            ``refine``).
        eval_templates: the templates of the zero-shot classifier that judges each strength (a set name such as
            ``"imagenet"`` or ``"single"``, or format strings); default: the evaluation harness's default (CLIP's
            80-template ensemble), as ``hf-clip-forget eval`` uses. Recorded in the report.
        adapter_name: name of the new adapter (as in ``add_forget_adapter``).
        batch_size: images per forward pass when embedding ``data``.
        text_batch_size: prompts per text-tower batch.
        show_progress: progress bars (images, prompts, strengths).
        use_cache: take prompt embeddings from the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``).
        cache_features: take ``data``'s image features from the image-feature cache under
            ``$HF_HOME/hf_clip_forget/features`` (keyed on the vision tower, the image processor and the dataset's
            fingerprint), storing them there when missing.
        data_source: the path or Hub id ``data`` was loaded from; its files' identity joins the image-feature cache
            key, as ``hf-clip-forget eval`` keys it, so features that command cached are reused.
        **adapter_options: further ``add_forget_adapter`` options (``target``, ``templates``, ``ccup_lambda``,
            ``keep_shared_direction``, ``prototypes``, ``prototype_options``…); not ``alpha`` or ``ccup_mu``.

    Returns:
        A :class:`CalibrationResult` ``(model, report)``.

    Raises:
        ValueError / TypeError: a budget outside [0, 1], class names not in the data (close names suggested),
            domains not in its domain column, data without images of a forgotten class or cell, or of any retain
            class, or any input ``add_forget_adapter`` refuses — always before the model is modified.
    """
    started = time.perf_counter()
    budget, search = CalibrationBudget.of(budget), CalibrationSearch.of(search)
    judge = resolve_templates(eval_templates)
    refused = sorted(set(adapter_options) & set(REFUSED_OPTIONS))
    if refused:
        raise ValueError(f"`{refused[0]}` cannot be given to a calibration: {REFUSED_OPTIONS[refused[0]]}.")
    ccup_lambda = adapter_options.pop("ccup_lambda", None)
    if ccup_lambda is not None and search.lambdas is not None:
        raise ValueError("Give λ once: `ccup_lambda` (fixed) or `search={'lambdas': [...]}` (searched), not both.")
    method = method or ("ccup" if (paradigm or ("domain" if domains else "global")) != "global" else "nullspace")
    if method == "logit":
        raise ValueError(
            "calibrate_forget_adapter searches the strength of nullspace (α) and CCUP (μ) edits; method='logit' bakes "
            "its strengths into its factors and is not calibrated yet. Give `logit_mu` / `logit_margin` to "
            "`add_forget_adapter` (defaults measured in docs/domains.md), or calibrate method='ccup'."
        )
    holder = adapter_holder(model)
    base = holder.get_base_model() if holder is not None else model
    validation = read_validation_data(data)
    request = check_request(classes, retain_classes, domains, retain_domains, paradigm, validation)
    options = dict(retain_classes=list(request.retain_classes), method=method, domains=domains,
                   retain_domains=retain_domains, paradigm=paradigm, **adapter_options)  # fmt: skip
    fixed = {} if ccup_lambda is None else {"ccup_lambda": ccup_lambda}  # else the config's default λ
    config = forget_config(base, list(request.classes), **options, **fixed)
    grid = search.grid(config.method, config.ccup_lambda)
    name = _new_adapter_name(adapter_name, holder)  # refuses a taken or malformed name now
    features = _image_features(base, data, image_processor, batch_size, show_progress, cache_features, data_source)
    classifier = _ZeroShot(base, resolve_tokenizer(base, tokenizer), features, judge, text_batch_size,
                           use_cache)  # fmt: skip
    before = classifier.correct(refresh_text=True)
    forget, kept = groups(request, validation)
    bounded = kept_groups(request, validation)
    previous = list(holder.active_adapters) if holder is not None else []
    with warnings.catch_warnings():  # a data-free guess of the effect of the first strength: about to be measured
        warnings.simplefilter("ignore", WeakEditWarning)
        edited = add_forget_adapter(
            model, list(request.classes), tokenizer, adapter_name=name, image_processor=image_processor,
            batch_size=text_batch_size, show_progress=show_progress, use_cache=use_cache, **options,
            **(fixed | grid[0]),
        )  # fmt: skip
    try:
        edits_text = any(
            not layer.image_side and name in layer.projection_edit_settings
            for layer in edited.base_model.forget_layers().values()
        )
        kept_before = masked_accuracy(before, kept)

        def evaluate(strength: dict[str, float]) -> Candidate:
            set_strength(edited, name, strength)
            correct = classifier.correct(refresh_text=edits_text)
            drops = {
                group: masked_accuracy(before, mask) - masked_accuracy(correct, mask)
                for group, mask in bounded.items()
            }
            group = max(drops, key=drops.get)
            return Candidate(dict(strength), masked_accuracy(correct, forget), masked_accuracy(correct, kept),
                             drops[group], group, correct[bounded[group]])  # fmt: skip

        candidates = search_strengths(evaluate, config.method, search, budget, config.ccup_lambda, show_progress)
        chosen, rule = choose_candidate(candidates, budget)
        set_strength(edited, name, chosen.strength)
        after = classifier.correct(refresh_text=edits_text)  # the adapter as written
        report = CalibrationReport(
            adapter=name, classes=request.classes, retain_classes=request.retain_classes, domains=request.domains,
            retain_domains=request.retain_domains, paradigm=request.paradigm, method=config.method, budget=budget,
            budget_met=chosen.meets(budget), choice=rule, searched=tuple(chosen.strength), chosen=chosen,
            candidates=candidates,
            forget_accuracy=BeforeAfter(masked_accuracy(before, forget), masked_accuracy(after, forget)),
            kept_accuracy=BeforeAfter(kept_before, masked_accuracy(after, kept)),
            per_class=_class_rows(request, validation, before, after),
            per_cell=_cell_rows(validation, forget, kept, before, after),
            validation=ValidationSet(len(validation), int(forget.sum()), int(kept.sum()), validation.sha256,
                                     validation.hashed),
            seconds=time.perf_counter() - started, classifier=describe_templates(judge),
        )  # fmt: skip
        set_strength(edited, name, chosen.strength, calibration=report.to_dict())
    except BaseException:
        _remove(edited, name, created=holder is None, active=previous)
        raise
    return CalibrationResult(edited, report)


def _image_features(base, data, image_processor, batch_size: int, show_progress: bool, use_cache: bool, source):
    """``data``'s image features: as given, from the image-feature cache, or embedded now (and cached)."""
    if isinstance(data, ImageFeatures):
        return data
    processor = image_processor if image_processor is not None else _load_image_processor(base)
    key = None
    if use_cache:
        try:
            key = image_features_key(base, processor, data, source)
        except TypeError:  # a processor without settings to key on: embed without the cache
            key = None
    if key is None:
        return embed_images(base, data, processor, batch_size=batch_size, show_progress=show_progress)
    return load_or_embed_image_features(key, base, processor, data, batch_size=batch_size, show_progress=show_progress)


class _ZeroShot:
    """Zero-shot classification of the validation images by the model as it is now, among all the data's classes
    with ``templates`` (``None``: the harness's default); the class embeddings are kept until ``refresh_text``."""

    def __init__(self, base, tokenizer, features: ImageFeatures, templates, text_batch_size: int, use_cache: bool):
        self.base, self.tokenizer, self.features, self.templates = base, tokenizer, features, templates
        self.text_batch_size, self.use_cache = text_batch_size, use_cache
        self.text: Tensor | None = None

    @torch.no_grad()
    def correct(self, refresh_text: bool) -> Tensor:
        """``(n,)`` bool: which images are classified as their label."""
        if self.text is None or refresh_text:
            self.text = class_embeddings(
                self.base, self.tokenizer, list(self.features.class_names), self.templates, self.text_batch_size,
                show_progress=False, use_cache=self.use_cache,
            )  # fmt: skip
        logits = zero_shot_logits(project_image_features(self.base, self.features), self.text)
        return logits.argmax(dim=-1) == self.features.labels


def _rows(names, groups_of, index: Tensor, count: int, before: Tensor, after: Tensor) -> tuple[GroupAccuracy, ...]:
    images, accuracy_before = group_accuracies(before, index, count)
    _, accuracy_after = group_accuracies(after, index, count)
    return tuple(
        GroupAccuracy(names[i], groups_of(i), int(images[i]), float(accuracy_before[i]), float(accuracy_after[i]))
        for i in range(count)
        if images[i] > 0
    )


def _class_rows(request: CalibrationRequest, data: ValidationData, before, after) -> tuple[GroupAccuracy, ...]:
    def role(i: int) -> str:
        name = data.class_names[i]
        if name in request.classes:
            return "forget" if request.paradigm == "global" else "other"
        return "kept" if name in request.retain_classes else "other"

    return _rows(data.class_names, role, data.labels, len(data.class_names), before, after)


def _cell_rows(data: ValidationData, forget: Tensor, kept: Tensor, before, after) -> tuple[GroupAccuracy, ...]:
    if data.domains is None:
        return ()
    count = len(data.class_names)
    index = data.domains * count + data.labels
    names = [f"{domain}/{name}" for domain in data.domain_names for name in data.class_names]
    in_forget = torch.zeros(len(names), dtype=torch.bool).index_fill_(0, index[forget], True)
    in_kept = torch.zeros(len(names), dtype=torch.bool).index_fill_(0, index[kept], True)

    def role(i: int) -> str:
        return "forget" if in_forget[i] else "kept" if in_kept[i] else "other"

    return _rows(names, role, index, len(names), before, after)


def _remove(model: ForgetPeftModel, name: str, created: bool, active: list[str]) -> None:
    """Take back the adapter a failed calibration added (and the wrapper, if this call created it)."""
    if name not in model.peft_config:
        return
    if created:
        model._discard(name)  # the last adapter: the forget layers go, the base model is as it was
        return
    merged = sorted({n for layer in model.base_model.forget_layers().values() for n in layer.merged_adapters})
    model._discard(name)
    if merged:
        model.base_model.merge_adapter(merged)
    if active:
        model.base_model.set_adapter(active, inference_mode=True)


__all__ = ["REFUSED_OPTIONS", "CalibrationResult", "calibrate_forget_adapter"]
