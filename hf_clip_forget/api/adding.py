"""``add_forget_adapter``: class names in, a forget adapter out — as a new ``ForgetPeftModel`` or stacked onto the
one that already holds the model's forget adapters (never replacing one)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from peft import PeftModel
from torch import Tensor, nn

from ..core import DEFAULT_RANK_TOLERANCE, resolve_templates, validate_class_names
from ..core.domains import default_ccup_mu
from ..core.tokenizer_checks import warn_about_unknown_domains
from ..families import family_of
from ..tuners.projection_edit import ProjectionEditConfig, ProjectionEditLayer
from ..tuners.projection_edit.build import BuildInputs, BuiltAdapter, build_adapter
from ..tuners.projection_edit.names import check_adapter_name
from .peft_model import ForgetPeftModel, _quiet_peft_wrapping


#: id(base model) → the ForgetPeftModel wrapping it, so that a second call on the base model stacks onto it.
_HOLDERS: weakref.WeakValueDictionary[int, ForgetPeftModel] = weakref.WeakValueDictionary()


def add_forget_adapter(
    model: nn.Module,
    classes: Sequence[str] | None = None,
    tokenizer=None,
    *,
    retain_classes: Sequence[str] | None = None,
    alpha: float | None = None,
    method: str | None = None,
    templates: str | Sequence[str] | None = None,
    average_templates: bool = True,
    target: str = "visual",
    adapter_name: str | None = None,
    text_embeds: Tensor | None = None,
    retain_text_embeds: Tensor | None = None,
    ccup_lambda: float | None = None,
    ccup_mu: float | None = None,
    logit_mu: float | None = None,
    logit_margin: float | None = None,
    keep_shared_direction: bool | None = None,
    domains: Sequence[str] | None = None,
    retain_domains: Sequence[str] | None = None,
    paradigm: str | None = None,
    domain_templates: dict[str, Sequence[str]] | None = None,
    prototypes: int = 0,
    retain_prototypes: int = 0,
    prototype_options: dict[str, Any] | None = None,
    image_processor=None,
    rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
    expand_neighbours: int = 0,
    batch_size: int = 256,
    show_progress: bool = True,
    use_cache: bool = True,
) -> ForgetPeftModel:
    """Forget ``classes`` from a dual encoder's zero-shot recognition, with no data and no training.

    The class names are embedded with the model's own text tower; a closed-form edit of the projection layer(s)
    removes their directions, and is attached as a peft adapter that can be merged, unmerged (exactly), stacked,
    saved and loaded. Nothing is modified until every input has been checked and the edit computed.

    Args:
        model: a ``CLIPModel`` or ``VisionTextDualEncoderModel`` (see ``hf_clip_forget.families``), or the
            :class:`ForgetPeftModel` / forget ``PeftModel`` holding its adapters. Called again on a base model that
            a ``ForgetPeftModel`` already wraps, the new adapter is stacked onto that one, never replacing it.
        classes: class names to forget, e.g. ``["cat", "dog"]``. Optional with ``text_embeds`` (then they label it).
        tokenizer: the model's tokenizer. If omitted, it is loaded from the model's ``name_or_path``. A tokenizer
            that cannot belong to the model's text tower is refused.
        retain_classes: the other classes the model should still recognise, e.g. the rest of a label set. They
            define the direction all classes share, which the image-side edit then keeps (see
            ``keep_shared_direction``); CCUP also keeps each of them; text-side edits keep them exactly.
        alpha: nullspace strength in [0, 1] (default 1); the forget component of every image embedding is scaled
            by ``1 − alpha``. A CCUP edit refuses it (its strength is ``ccup_lambda`` / ``ccup_mu``), as a nullspace
            edit refuses those: a strength the method ignores would be recorded and change nothing.
        method: ``"nullspace"`` (``I − α QQᵀ``), ``"ccup"`` (keeps ``retain_classes``; weights ``ccup_lambda`` λ
            and ``ccup_mu`` μ, each at most 1e8) or ``"logit"`` (image side, needs ``retain_classes``: lowers only the
            forgotten classes' logits — no other class's score moves — along what separates their forget prompts
            from the kept cells; strengths ``logit_mu`` and ``logit_margin``; :mod:`hf_clip_forget.core.logit_edit`,
            measured in ``docs/domains.md``). Default: ``"logit"`` for ``paradigm="domain"`` with ``retain_classes``,
            no prototypes and no ``ccup_mu`` / ``ccup_lambda`` (measured best there), ``"ccup"`` for the other domain edits (a nullspace cannot keep the class in the
            other domains), ``"nullspace"`` otherwise.
        templates: prompt templates: a list of format strings with one ``{}``, one string, or the name of a
            built-in set (``"single"``, ``"imagenet_selected"`` (7), ``"cifar"`` (18), ``"imagenet"`` (80)). Default:
            the family's — CLIP's 7 selected templates for a global image-side edit that names its retain classes,
            the 80-template ensemble otherwise (measured: ``docs/templates.md``).
        average_templates: average each class's template embeddings into one direction (default) or keep one
            direction per (class, template).
        target: ``"visual"`` (edit ``visual_projection``, default), ``"text"`` (edit ``text_projection``: forgotten
            prompts become generic ones) or ``"both"``.
        adapter_name: name of the new adapter (default ``"default"`` for the first, ``"forget_<n>"`` after): 1 to 96
            ASCII letters, digits, ``_`` and ``-``, not starting with ``-`` (it names a folder and a Hub path;
            :func:`~hf_clip_forget.tuners.projection_edit.names.check_adapter_name`).
        text_embeds: precomputed ``(n, d)`` text embeddings to forget, instead of embedding ``classes``.
        retain_text_embeds: precomputed ``(r, d)`` embeddings to keep, instead of embedding ``retain_classes``.
        ccup_lambda, ccup_mu: CCUP weights λ (forget, default 1000) and μ (retain), in [0, 1e8]. ``ccup_mu`` defaults to the
            paradigm's (:data:`~hf_clip_forget.core.domains.DEFAULT_CCUP_MU`: chosen by measurement for
            ``"domain"``, ``docs/domains.md``; 100 otherwise); the config records the value used. For a
            domain-specific edit μ *is* the trade-off between forgetting the cell and keeping the class in the
            other domains: lower forgets more and keeps less. ``calibrate_forget_adapter`` chooses it on your
            labelled images.
        logit_mu, logit_margin: strengths of ``method="logit"``: the weight μ ≥ 0 of the kept cells' prompts (larger
            moves the forgotten class less on them; default 10) and how far below the best other class its logit must
            fall on its own forget prompts (cosine units ≥ 0, default 0.2; larger forgets harder). Defaults chosen on
            PACS train with the demo model (``scripts/measure_domain_variants.py``).
        keep_shared_direction: take the image-side forget directions orthogonal to the mean direction of all named
            classes (forget and retain), so that a forgotten class's logit drops to about the average logit instead
            of 0. Default: on when ``retain_classes`` (or ``retain_text_embeds``) are given, the target is not
            ``"text"`` and no ``prototypes`` are requested (``docs/forgetting.md``).
        domains: image domains (e.g. ``["sketch"]``): with ``paradigm="domain"`` (the default once ``domains`` are
            given) the classes are forgotten only there; with ``"global"`` their domain-conditioned prompts ("a sketch
            of a dog.") join the forget subspace. See :mod:`hf_clip_forget.core.domains` for the three paradigms.
        retain_domains: the domains where the classes must stay recognisable (required by ``paradigm="domain"``).
        paradigm: ``"global"`` (everywhere), ``"domain"`` (only in ``domains``, kept in ``retain_domains``) or
            ``"complete"`` (only in ``domains``, without protecting the classes elsewhere: a stronger erasure).
        domain_templates: templates per domain, overriding the built-in ones (``DOMAIN_TEMPLATES``: photo,
            art_painting, cartoon, sketch) and the generic ``"a {domain} of a {}."`` for others.
        prototypes: synthesised visual prototypes per forget cell (0: text directions only); their image
            embeddings join the forget subspace (:func:`~hf_clip_forget.core.synthesize_prototypes`; about 20 s
            per 4 prototypes on a 2-core CPU for the demo model).
        retain_prototypes: prototypes per retain cell (0: none), joining the retain set.
        prototype_options: keyword arguments for :func:`~hf_clip_forget.core.synthesize_prototypes` (``steps``,
            ``seed``, ``learning_rate``, ``grid``, ``tv_weight``, ``jitter``, ``batch_size``); recorded in the config.
        image_processor: the model's image processor (input size and normalisation of the prototypes); loaded
            from the model's checkpoint when omitted and prototypes are requested.
        rank_tolerance: relative singular value in (0, 1) under which a direction of the forget set counts as noise.
        expand_neighbours: also forget, per class, this many whole words of the tokenizer's vocabulary nearest to
            it under the unedited text tower (its other names: "puppy" for "dog"); the words are recorded in the
            config's ``neighbour_names`` and listed on the card. The audit (``audit_forgetting``) measures why: a
            class forgotten by name alone can come back under such a word (``docs/audit.md``).
        batch_size: prompts per text-tower batch (a positive integer).
        show_progress: show a progress bar while embedding prompts.
        use_cache: take the prompts' embeddings from the prompt-embedding cache (in memory and under
            ``$HF_HOME/hf_clip_forget/prompts``; ``hf_clip_forget.core.prompt_cache``), so that a repeated edit with
            the same prompts does not run the text tower again; ``False`` encodes them anew (as does
            ``HF_CLIP_FORGET_PROMPT_CACHE=0``).

    Returns:
        A :class:`ForgetPeftModel` (a ``peft.PeftModel``) wrapping ``model``; ``model`` itself is wrapped in place,
        as with ``peft.get_peft_model``. When ``model`` already holds forget adapters, the new one is added to the
        ``ForgetPeftModel`` holding them, which is returned.

    Raises:
        ValueError / TypeError: on any bad input, an unsupported model class, a tokenizer of another model, or an
            edit that would change nothing (rank 0) — always before the model is modified.

    Warns:
        UnknownNameWarning: a class or domain name that is most likely a typo (its message names the closest known
            words: "did you mean 'dog'?"); filter it for names you mean, or turn it into an error.
        WeakEditWarning: a domain-specific (or text-side) edit built without calibration is predicted, data-free,
            to change little (its forgotten cells' prompts keep most of their zero-shot margin); the message gives
            the predicted numbers and the fixes. The estimate is recorded in the adapter's
            ``provenance["effect_estimate"]`` (:mod:`hf_clip_forget.core.effect`).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)  # untrusted text that becomes a folder and a key: checked first of all
    holder = adapter_holder(model)
    base = holder.get_base_model() if holder is not None else model
    name = _new_adapter_name(adapter_name, holder)
    config = forget_config(
        base, classes, text_embeds=text_embeds, retain_classes=retain_classes, retain_text_embeds=retain_text_embeds,
        alpha=alpha, method=method, templates=templates, average_templates=average_templates, target=target,
        ccup_lambda=ccup_lambda, ccup_mu=ccup_mu, logit_mu=logit_mu, logit_margin=logit_margin,
        keep_shared_direction=keep_shared_direction, domains=domains,
        retain_domains=retain_domains, paradigm=paradigm, domain_templates=domain_templates, prototypes=prototypes,
        retain_prototypes=retain_prototypes, prototype_options=prototype_options, rank_tolerance=rank_tolerance,
        expand_neighbours=expand_neighbours,
    )  # fmt: skip
    inputs = BuildInputs(
        tokenizer, image_processor, text_embeds, retain_text_embeds, batch_size, show_progress, use_cache
    )
    built = build_adapter(base, config, inputs)
    if holder is not None:
        _stack_adapter(holder, name, built)
        return holder
    with _quiet_peft_wrapping():
        peft_model = ForgetPeftModel(base, built.config, adapter_name=name)
    peft_model.base_model.set_factors(name, built.factors)
    _HOLDERS[id(base)] = peft_model
    return peft_model


def default_method(paradigm: str, retain_classes, prototypes: bool = False, settings: dict | None = None) -> str:
    """The method an edit uses when none is given: ``"logit"`` for ``paradigm="domain"`` with the other candidates
    named, no prototypes and no CCUP strength given (on PACS it reaches the seed paper's goal on two of four tasks,
    CCUP on one: ``docs/domains.md``); ``"ccup"`` for the other domain edits (a nullspace cannot keep the class in the
    other domains; a domain edit given ``ccup_mu`` or ``ccup_lambda`` stays the CCUP edit it was before ``"logit"``
    became the default); ``"nullspace"`` for global ones."""
    ccup_given = any((settings or {}).get(name) is not None for name in STRENGTH_SETTINGS["ccup"])
    if paradigm == "domain" and retain_classes and not prototypes and not ccup_given:
        return "logit"
    return "ccup" if paradigm != "global" else "nullspace"


#: The strength settings of each edit method (what the other method ignores) and their defaults.
STRENGTH_SETTINGS = {
    "nullspace": {"alpha": 1.0},
    "ccup": {"ccup_lambda": 1000.0, "ccup_mu": None},
    "logit": {"logit_mu": 10.0, "logit_margin": 0.2},
}


def _strength(method: str, paradigm: str, settings: dict) -> dict:
    """``settings`` with the method's strength defaults filled (``ccup_mu``: the paradigm's default); a strength of
    the other method, given, is refused — it would be recorded in the config and change nothing."""
    for other, fields in STRENGTH_SETTINGS.items():
        given = [name for name in fields if settings.get(name) is not None]
        if other != method and given:
            raise ValueError(
                f"`{given[0]}` is a strength of {other} edits, and this edit uses method={method!r}, which ignores "
                f"it. Give {' / '.join(f'`{n}`' for n in STRENGTH_SETTINGS.get(method, {}))} instead, or "
                f"method={other!r}."
            )
    filled = dict(settings)
    for name, default in STRENGTH_SETTINGS.get(method, {}).items():
        if filled.get(name) is None:
            filled[name] = default_ccup_mu(paradigm) if name == "ccup_mu" else default
    for name in ("alpha", "ccup_lambda", "ccup_mu", "logit_mu", "logit_margin"):  # the config's own defaults
        if filled.get(name) is None:
            filled.pop(name, None)
    return filled


def forget_config(
    model: nn.Module,
    classes,
    *,
    text_embeds=None,
    retain_classes=None,
    retain_text_embeds=None,
    method=None,
    target="visual",
    keep_shared_direction=None,
    domains=None,
    retain_domains=None,
    paradigm=None,
    templates=None,
    prototypes=0,
    retain_prototypes=0,
    prototype_options=None,
    **settings,
) -> ProjectionEditConfig:
    """The validated :class:`ProjectionEditConfig` of an ``add_forget_adapter`` request on ``model`` (unwrapped),
    its defaults resolved.

    ``settings`` are the config fields passed through unchanged (``alpha``, ``ccup_lambda``, ``ccup_mu``,
    ``average_templates``, ``domain_templates``, ``rank_tolerance``, ``expand_neighbours``); a ``ccup_mu`` of
    ``None`` (or none) becomes the paradigm's default (:func:`~hf_clip_forget.core.domains.default_ccup_mu`).
    """
    classes = _class_names(classes, text_embeds)
    if retain_classes is not None:
        retain_classes = validate_class_names(retain_classes, "retain_classes")
        overlap = sorted(set(classes) & set(retain_classes))
        if overlap:
            raise ValueError(f"{overlap} are both forgotten and retained; a class must be in only one of the lists.")
    for argument, value in (("prototypes", prototypes), ("retain_prototypes", retain_prototypes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{argument}` must be an integer >= 0 (prototypes per cell), got {value!r}.")
    family = family_of(model)
    target_modules = family.target_modules(target)  # refuses unsupported models and unknown targets
    if (prototypes or retain_prototypes) and not family.supports_prototypes:
        raise ValueError(
            f"Visual prototypes are synthesised pixel images of whole scenes, which a {family.name} model does not "
            f"take (its image side {_image_side_inputs(family)}). Build the edit from class names alone "
            "(prototypes=0)."
        )
    domain_aware = any(x is not None for x in (domains, retain_domains, paradigm)) or bool(
        prototypes or retain_prototypes
    )
    if domain_aware and target != "visual":
        raise ValueError("Domain-aware edits and visual prototypes act on the image side; use target='visual'.")
    for names in (domains, retain_domains):  # class names are checked where they are tokenized
        warn_about_unknown_domains(names, settings.get("domain_templates"))
    paradigm = paradigm or ("domain" if domains else "global")
    method = method or default_method(paradigm, retain_classes, bool(prototypes or retain_prototypes), settings)
    settings = _strength(method, paradigm, settings)
    has_retain = retain_classes is not None or retain_text_embeds is not None or paradigm == "domain"
    if method == "logit" and keep_shared_direction:
        raise ValueError(
            "`keep_shared_direction` shapes nullspace and CCUP edits; method='logit' moves only the forgotten "
            "classes' logits and has no shared direction to keep. Drop `keep_shared_direction`."
        )
    if keep_shared_direction is None:
        # with prototypes, the text-side shared direction would keep the forgotten class's share while the
        # prototypes' image-side common component is removed from every image (measured in docs/domains.md)
        keep_shared_direction = has_retain and target != "text" and not prototypes and method != "logit"
    elif keep_shared_direction and target == "text":
        raise ValueError(
            "`keep_shared_direction` shapes the image-side edit; with target='text' there is none. Use "
            "target='visual' or 'both', or drop `keep_shared_direction`."
        )
    elif keep_shared_direction and not has_retain:
        raise ValueError(
            "`keep_shared_direction=True` needs `retain_classes`: the shared direction is the mean of all named "
            "classes (forget and retain). Pass the other classes the model should keep recognising."
        )
    return ProjectionEditConfig(
        target_modules=list(target_modules),
        method=method,
        keep_shared_direction=bool(keep_shared_direction),
        paradigm=paradigm,
        domains=list(domains or []),
        retain_domains=list(retain_domains or []),
        prototypes=prototypes,
        retain_prototypes=retain_prototypes,
        prototype_options=dict(prototype_options or {}) if (prototypes or retain_prototypes) else {},
        forgotten_classes=classes,
        retain_classes=list(retain_classes or []),
        templates=resolve_templates(
            family.templates_for(target, retain_named=has_retain and paradigm == "global")
            if templates is None
            else templates
        ),
        embedding_source="text_embeds" if text_embeds is not None else "class_names",
        **settings,
    )


def _image_side_inputs(family) -> str:
    if family.detector:
        return "embeds every detected box"
    if family.patch_inputs:
        return "takes images cut into patches with their grid"
    return f"takes {family.inputs}"


def _class_names(classes, text_embeds) -> list[str]:
    if text_embeds is None:
        return validate_class_names(classes)
    rows = text_embeds.shape[0] if isinstance(text_embeds, Tensor) and text_embeds.ndim == 2 else None
    if classes is None and rows is not None:
        classes = [f"<embedding {i}>" for i in range(rows)]
    classes = validate_class_names(classes)
    if rows is not None and len(classes) != rows:
        raise ValueError(f"`classes` names {len(classes)} classes but `text_embeds` has {rows} rows.")
    return classes


def adapter_holder(model: nn.Module) -> PeftModel | None:
    """The PeftModel whose forget adapters a new adapter stacks onto: ``model`` itself, or the ForgetPeftModel
    wrapping the base ``model``; ``None`` for a base model holding no forget layers. Refuses what cannot be
    stacked onto (another peft method, forget layers injected by plain peft)."""
    if isinstance(model, PeftModel):
        if not holds_forget_adapters(model):
            raise TypeError(
                f"{type(model).__name__} holds adapters of another peft method; forget adapters cannot share a "
                "PeftModel with other peft methods. Pass the base model, or a model loaded with "
                "ForgetPeftModel.from_pretrained."
            )
        return model
    if not any(isinstance(module, ProjectionEditLayer) for module in model.modules()):
        return None
    holder = _HOLDERS.get(id(model))
    if holder is not None and holder.get_base_model() is model:
        return holder
    raise ValueError(
        "This model already holds forget adapters, injected without a ForgetPeftModel (get_peft_model, "
        "inject_adapter_in_model or model.add_adapter); a new adapter must stack onto them, never replace them. Call "
        "`add_forget_adapter` on the PeftModel that holds them, or pass `ProjectionEditConfig(forgotten_classes=...)` "
        "to its `add_adapter`."
    )


def holds_forget_adapters(model) -> bool:
    """A PeftModel whose adapters are all forget adapters (a ForgetPeftModel, or a PeftModel loaded by peft)."""
    return isinstance(model, PeftModel) and all(
        isinstance(config, ProjectionEditConfig) for config in model.peft_config.values()
    )


def _new_adapter_name(adapter_name: str | None, holder: PeftModel | None) -> str:
    existing = set(holder.peft_config) if holder is not None else set()
    if adapter_name is None:
        if not existing:
            return "default"
        index = len(existing)
        while f"forget_{index}" in existing:
            index += 1
        return f"forget_{index}"
    check_adapter_name(adapter_name)
    if adapter_name in existing:
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists (adapters: {sorted(existing)}). Choose another "
            "`adapter_name`, or `delete_adapter` the old one first."
        )
    return adapter_name


def _stack_adapter(model: PeftModel, name: str, built: BuiltAdapter) -> None:
    active = [n for n in model.active_adapters if n in model.peft_config]
    merged = sorted({n for layer in model.base_model.forget_layers().values() for n in layer.merged_adapters})
    if merged:
        model.base_model.unmerge_adapter()  # bit-exact; peft would otherwise unmerge with a warning
    try:
        with _quiet_peft_wrapping():
            model.add_adapter(name, built.config)
        model.base_model.set_factors(name, built.factors)
    except Exception:
        if name in model.peft_config:
            model.delete_adapter(name)
        raise
    finally:
        model.base_model.set_adapter(active + ([name] if name in model.peft_config else []), inference_mode=True)
        if merged:
            model.base_model.merge_adapter(merged)


def _model_method(self, classes=None, tokenizer=None, **options):
    return add_forget_adapter(self, classes, tokenizer, **options)


_model_method.__doc__ = add_forget_adapter.__doc__
_model_method.__name__ = "add_forget_adapter"


def install_model_methods() -> None:
    """Give every supported model class, and :class:`ForgetPeftModel` (where it stacks), an ``add_forget_adapter``
    method (idempotent; an existing attribute of that name is never replaced)."""
    import transformers

    from ..families import SUPPORTED_MODEL_CLASSES

    classes = [getattr(transformers, name, None) for name in SUPPORTED_MODEL_CLASSES] + [ForgetPeftModel]
    for model_cls in classes:
        if model_cls is not None and "add_forget_adapter" not in vars(model_cls):
            model_cls.add_forget_adapter = _model_method
