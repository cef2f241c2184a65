"""Layer 3 — the user API: :func:`add_forget_adapter` and :class:`ForgetPeftModel`.

``import hf_clip_forget`` also gives ``CLIPModel`` and ``VisionTextDualEncoderModel`` an ``add_forget_adapter``
method (the same function), so that::

    model = clip.add_forget_adapter(["cat", "dog"], tokenizer=tokenizer)   # a ForgetPeftModel (peft.PeftModel)
    model = model.add_forget_adapter(["truck"], adapter_name="vehicles")   # stacks: both forgotten
    model.merge_adapter(); model.unmerge_adapter()                          # exact round trip
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft import PeftModel
from torch import Tensor, nn

from ._version import __version__
from .core import (
    DEFAULT_RANK_TOLERANCE,
    EDIT_METHODS,
    DomainCell,
    EditFactors,
    build_edit_factors,
    check_tokenizer_fits,
    class_text_embeddings,
    encode_prompts,
    normalize_rows,
    plan_domain_edit,
    resolve_templates,
    synthesize_prototypes,
    validate_class_names,
)
from .core import (
    domain_templates as templates_of_domain,
)
from .core.fingerprint import fingerprint_weight
from .core.subspace import check_alpha, check_nonnegative
from .tuners.projection_edit import PEFT_TYPE, SAVED_PEFT_TYPE, ProjectionEditConfig, ProjectionEditLayer


#: ``target`` option → projection layers edited.
TARGETS: dict[str, tuple[str, ...]] = {
    "visual": ("visual_projection",),
    "text": ("text_projection",),
    "both": ("visual_projection", "text_projection"),
}
ADAPTER_CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class _AdapterPlan:
    """Everything an adapter needs, computed before the model is touched."""

    adapter_name: str
    config: ProjectionEditConfig
    factors: dict[str, tuple[Tensor, Tensor | None]]


class ForgetPeftModel(PeftModel):
    """A :class:`peft.PeftModel` holding a stack of forget adapters on a dual encoder.

    Everything of ``PeftModel`` works as usual (``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``,
    ``unload``, ``delete_adapter``, ``disable_adapter``, ``save_pretrained``, ``get_image_features``…). In addition:

    * :meth:`add_forget_adapter` adds another named adapter; all added adapters are active together and their
      combined effect is the union of their forget subspaces;
    * :meth:`set_adapter` accepts a list of names;
    * :meth:`from_pretrained` loads every adapter of a saved stack (the root one and those in subfolders) and
      activates them all;
    * :attr:`forgotten_classes` says what each adapter forgets.
    """

    #: Writes ``README.md`` into a save directory: ``writer(model, directory, merged=False)``. The Hub layer
    #: (:mod:`hf_clip_forget.hub`, which imports this module) plugs its model card in here; without it peft's
    #: generic card is written.
    model_card_writer: ClassVar[Callable[..., None] | None] = None
    #: Uploads a model to the Hub: ``uploader(model, repo_id, **options)``; plugged in by :mod:`hf_clip_forget.hub`.
    hub_uploader: ClassVar[Callable[..., Any] | None] = None

    def add_forget_adapter(self, classes: Sequence[str] | None = None, tokenizer=None, **options) -> ForgetPeftModel:
        """Add another forget adapter on top of the active ones. Same arguments as :func:`add_forget_adapter`,
        whose ``adapter_name`` must be new (the default is ``"forget_<n>"``)."""
        return add_forget_adapter(self, classes, tokenizer, **options)

    @property
    def forgotten_classes(self) -> dict[str, list[str]]:
        """Adapter name → the classes it forgets."""
        return {name: list(config.forgotten_classes) for name, config in self.peft_config.items()}

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = True) -> None:
        """Activate one adapter or, given a list, several together (their union is applied)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        if isinstance(adapter_name, str):
            super().set_adapter(adapter_name, inference_mode=inference_mode)
        else:
            self.base_model.set_adapter(names, inference_mode=inference_mode)

    def create_or_update_model_card(self, output_dir: str) -> None:
        writer = type(self).model_card_writer
        if writer is None:
            return super().create_or_update_model_card(output_dir)
        writer(self, output_dir)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """``PeftModel.save_pretrained``, made atomic: everything is written to a new directory beside
        ``save_directory`` that replaces it only once complete, so a failure midway leaves an existing directory
        exactly as it was. Files of an existing directory that are not part of a saved adapter are kept."""
        write_directory_atomically(
            save_directory, lambda staging: super(ForgetPeftModel, self).save_pretrained(staging, **kwargs)
        )

    def save_merged_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the full model with the active adapters merged into its weights, as a plain transformers checkpoint
        (``CLIPModel.from_pretrained(save_directory)`` loads it). This model itself is not modified. Atomic, as
        :meth:`save_pretrained`; the card still lists what was forgotten and where the original is."""

        def write(staging: str) -> None:
            with self._merged_plain_layers():
                self.get_base_model().save_pretrained(staging, **kwargs)
            writer = type(self).model_card_writer
            if writer is not None:
                writer(self, staging, merged=True)

        write_directory_atomically(save_directory, write)

    def push_to_hub(self, repo_id: str, **options):
        """Upload the adapters (default) or, with ``merged=True``, the merged full model, with a model card
        listing what was forgotten, in one commit. See :func:`hf_clip_forget.hub.push_to_hub` for the options."""
        uploader = type(self).hub_uploader
        if uploader is None:
            raise RuntimeError("Hub support is not loaded: `import hf_clip_forget` (it loads hf_clip_forget.hub).")
        return uploader(self, repo_id, **options)

    @contextlib.contextmanager
    def _merged_plain_layers(self):
        """Temporarily replace every forget layer by a plain ``nn.Linear`` holding its merged weight."""
        swapped = []
        try:
            for name, layer in self.base_model.forget_layers().items():
                active = [n for n in self.active_adapters if n in layer.projection_edit_settings]
                merged = layer.unedited_weight().clone()
                if active:
                    edit = layer.combined_edit(active)
                    merged = edit.apply_to_weight(merged.to(torch.float32)).to(merged.dtype)
                plain = nn.Linear(
                    layer.in_features, layer.out_features, bias=False, device=merged.device, dtype=merged.dtype
                )
                plain.weight.data = merged
                parent_name, _, child = name.rpartition(".")
                parent = self.base_model.model.get_submodule(parent_name)
                setattr(parent, child, plain)
                swapped.append((parent, child, layer))
            yield
        finally:
            for parent, child, layer in swapped:
                setattr(parent, child, layer)

    @classmethod
    def from_pretrained(cls, model, model_id: str | os.PathLike, adapter_name: str = "default", **kwargs):
        """Load a saved forget adapter — or every adapter of a saved stack — onto ``model``.

        Without ``subfolder``, the adapter at the root of ``model_id`` (named ``adapter_name``) and one adapter per
        subfolder holding an ``adapter_config.json`` (named after the subfolder, as ``save_pretrained`` writes
        them) are loaded and all activated. ``model_id`` is a local directory or a Hub repo id.
        """
        with _quiet_peft_wrapping():
            return cls._load_stack(model, model_id, adapter_name, **kwargs)

    @classmethod
    def _load_stack(cls, model, model_id, adapter_name: str, **kwargs):
        if "subfolder" in kwargs:
            return super().from_pretrained(model, model_id, adapter_name=adapter_name, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
        entries = _saved_adapters(str(model_id), adapter_name, **hub_kwargs)
        if not entries:
            return super().from_pretrained(model, model_id, adapter_name=adapter_name, **kwargs)
        (first_name, first_subfolder), rest = entries[0], entries[1:]
        first_kwargs = dict(kwargs, **({"subfolder": first_subfolder} if first_subfolder else {}))
        peft_model = super().from_pretrained(model, model_id, adapter_name=first_name, **first_kwargs)
        for name, subfolder in rest:
            load_kwargs = {k: v for k, v in kwargs.items() if k not in ("is_trainable", "config")}
            peft_model.load_adapter(model_id, adapter_name=name, subfolder=subfolder, **load_kwargs)
        names = [name for name, _ in entries]
        peft_model.base_model.set_adapter(names, inference_mode=True)
        return peft_model


def add_forget_adapter(
    model: nn.Module,
    classes: Sequence[str] | None = None,
    tokenizer=None,
    *,
    retain_classes: Sequence[str] | None = None,
    alpha: float = 1.0,
    method: str | None = None,
    templates: str | Sequence[str] | None = None,
    average_templates: bool = True,
    target: str = "visual",
    adapter_name: str | None = None,
    text_embeds: Tensor | None = None,
    retain_text_embeds: Tensor | None = None,
    ccup_lambda: float = 1000.0,
    ccup_mu: float = 100.0,
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
    batch_size: int = 256,
    show_progress: bool = True,
) -> ForgetPeftModel:
    """Forget ``classes`` from a dual encoder's zero-shot recognition, with no data and no training.

    The class names are embedded with the model's own text tower; a closed-form edit of the projection layer(s)
    removes their directions, and is attached as a peft adapter that can be merged, unmerged (exactly), stacked,
    saved and loaded. Nothing is modified until every input has been checked and the edit computed.

    Args:
        model: a ``CLIPModel``, a ``VisionTextDualEncoderModel`` (or a model with the same ``visual_projection`` /
            ``text_projection`` layers and ``get_text_features``), or a :class:`ForgetPeftModel` (or a ``PeftModel``
            of forget adapters loaded with peft) to stack onto.
        classes: class names to forget, e.g. ``["cat", "dog"]``. Optional with ``text_embeds`` (then they label it).
        tokenizer: the model's tokenizer. If omitted, it is loaded from the model's ``name_or_path``.
        retain_classes: the other classes the model should still recognise, e.g. the rest of a label set. They
            define the direction all classes share, which the image-side edit then keeps (see
            ``keep_shared_direction``); CCUP also keeps each of them; text-side edits keep them exactly.
        alpha: nullspace strength in [0, 1]; the forget component of every image embedding is scaled by
            ``1 − alpha``.
        method: ``"nullspace"`` (``I − α QQᵀ``) or ``"ccup"`` (keeps ``retain_classes``; weights ``ccup_lambda`` λ
            and ``ccup_mu`` μ). Default: ``"ccup"`` for the domain paradigms (a nullspace cannot keep the class in
            the other domains), ``"nullspace"`` otherwise.
        templates: prompt templates: a list of format strings with one ``{}``, one string, or the name of a
            built-in set (``"imagenet"``, the default 80-template ensemble, or ``"single"``).
        average_templates: average each class's template embeddings into one direction (default) or keep one
            direction per (class, template).
        target: ``"visual"`` (edit ``visual_projection``, default), ``"text"`` (edit ``text_projection``: forgotten
            prompts become generic ones) or ``"both"``.
        adapter_name: name of the new adapter (default ``"default"`` for the first, ``"forget_<n>"`` after).
        text_embeds: precomputed ``(n, d)`` text embeddings to forget, instead of embedding ``classes``.
        retain_text_embeds: precomputed ``(r, d)`` embeddings to keep, instead of embedding ``retain_classes``.
        ccup_lambda, ccup_mu: CCUP weights λ (forget) and μ (retain), both >= 0.
        keep_shared_direction: take the image-side forget directions orthogonal to the mean direction of all named
            classes (forget and retain), so that a forgotten class's logit drops to about the average logit instead
            of 0 while every other class keeps its common component. Default: on when ``retain_classes`` (or
            ``retain_text_embeds``) are given and no ``prototypes`` are requested. On the demo model this takes single-class nullspace forgetting from
            up to 15 % residual accuracy to 0 % (``docs/forgetting.md``).
        domains: image domains (e.g. ``["sketch"]``): with ``paradigm="domain"`` (the default once ``domains`` are
            given) the classes are forgotten only there; with ``"global"`` their domain-conditioned prompts ("a sketch
            of a dog.") join the forget subspace. See :mod:`hf_clip_forget.core.domains` for the three paradigms.
        retain_domains: the domains where the classes must stay recognisable (required by ``paradigm="domain"``).
        paradigm: ``"global"`` (everywhere), ``"domain"`` (only in ``domains``, kept in ``retain_domains``) or
            ``"complete"`` (only in ``domains``, without protecting the classes elsewhere: a stronger erasure).
        domain_templates: templates per domain, overriding the built-in ones (``DOMAIN_TEMPLATES``: photo,
            art_painting, cartoon, sketch) and the generic ``"a {domain} of a {}."`` for others.
        prototypes: synthesised visual prototypes per forget cell (0: text directions only). Their image
            embeddings join the forget subspace: they cover the image side of the modality gap
            (:func:`~hf_clip_forget.core.synthesize_prototypes`; about 20 s per 4 prototypes on a 2-core CPU for
            the demo model).
        retain_prototypes: prototypes per retain cell (0: none), joining the retain set.
        prototype_options: keyword arguments for :func:`~hf_clip_forget.core.synthesize_prototypes` (``steps``,
            ``seed``, ``learning_rate``, ``grid``, ``tv_weight``, ``jitter``, ``batch_size``); recorded in the config.
        image_processor: the model's image processor (input size and normalisation of the prototypes); loaded
            from the model's checkpoint when omitted and prototypes are requested.
        rank_tolerance: relative singular value under which a direction of the forget set counts as noise.
        batch_size: prompts per text-tower batch.
        show_progress: show a progress bar while embedding prompts.

    Returns:
        A :class:`ForgetPeftModel` (a ``peft.PeftModel``) wrapping ``model``; ``model`` itself is wrapped in place,
        as with ``peft.get_peft_model``. When ``model`` already holds forget adapters, the new one is added to it
        and ``model`` itself is returned.
    """
    plan = _plan_adapter(
        model,
        classes,
        tokenizer,
        retain_classes=retain_classes,
        alpha=alpha,
        method=method,
        templates=templates,
        average_templates=average_templates,
        target=target,
        adapter_name=adapter_name,
        text_embeds=text_embeds,
        retain_text_embeds=retain_text_embeds,
        ccup_lambda=ccup_lambda,
        ccup_mu=ccup_mu,
        keep_shared_direction=keep_shared_direction,
        domains=domains,
        retain_domains=retain_domains,
        paradigm=paradigm,
        domain_templates=domain_templates,
        prototypes=prototypes,
        retain_prototypes=retain_prototypes,
        prototype_options=prototype_options,
        image_processor=image_processor,
        rank_tolerance=rank_tolerance,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    name = plan.adapter_name
    if holds_forget_adapters(model):
        _stack_adapter(model, name, plan)
        return model
    with _quiet_peft_wrapping():
        peft_model = ForgetPeftModel(model, plan.config, adapter_name=name)
    peft_model.base_model.set_factors(name, plan.factors)
    return peft_model


def _stack_adapter(model: PeftModel, name: str, plan: _AdapterPlan) -> None:
    active = [n for n in model.active_adapters if n in model.peft_config]
    merged = sorted({n for layer in model.base_model.forget_layers().values() for n in layer.merged_adapters})
    if merged:
        model.base_model.unmerge_adapter()  # bit-exact; peft would otherwise unmerge with a warning
    try:
        model.add_adapter(name, plan.config)
        model.base_model.set_factors(name, plan.factors)
    except Exception:
        if name in model.peft_config:
            model.delete_adapter(name)
        raise
    finally:
        model.base_model.set_adapter(active + ([name] if name in model.peft_config else []), inference_mode=True)
        if merged:
            model.base_model.merge_adapter(merged)


def _plan_adapter(
    model,
    classes,
    tokenizer,
    *,
    retain_classes,
    alpha,
    method,
    templates,
    average_templates,
    target,
    adapter_name,
    text_embeds,
    retain_text_embeds,
    ccup_lambda,
    ccup_mu,
    keep_shared_direction,
    domains,
    retain_domains,
    paradigm,
    domain_templates,
    prototypes,
    retain_prototypes,
    prototype_options,
    image_processor,
    rank_tolerance,
    batch_size,
    show_progress,
) -> _AdapterPlan:
    """Validate everything and compute the adapter's config and factors, without modifying ``model``."""
    domain_aware = any(x is not None for x in (domains, retain_domains, paradigm)) or bool(
        prototypes or retain_prototypes
    )
    if method is None:
        method = "ccup" if (paradigm or ("domain" if domains else "global")) != "global" else "nullspace"
    for name, value in (("prototypes", prototypes), ("retain_prototypes", retain_prototypes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0 (prototypes per cell), got {value!r}.")
    if domain_aware and (text_embeds is not None or retain_text_embeds is not None):
        raise ValueError(
            "Domains and prototypes are built from class names; they cannot be combined with `text_embeds` / "
            "`retain_text_embeds`. Pass class names, or drop the domain and prototype options."
        )
    if domain_aware and target != "visual":
        raise ValueError(
            "Domain-aware edits and visual prototypes act on the image side; use target='visual' (the default)."
        )
    if method not in EDIT_METHODS:
        raise ValueError(f"`method` must be one of {list(EDIT_METHODS)}, got {method!r}.")
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}.")
    check_alpha(alpha)
    check_nonnegative(ccup_lambda, "ccup_lambda")
    check_nonnegative(ccup_mu, "ccup_mu")
    check_nonnegative(rank_tolerance, "rank_tolerance")
    if isinstance(model, PeftModel) and not holds_forget_adapters(model):
        raise TypeError(
            f"{type(model).__name__} is a PeftModel of another kind; forget adapters cannot share a PeftModel with "
            "other peft methods. Pass the base model, or a model loaded with ForgetPeftModel.from_pretrained."
        )
    wrapped = isinstance(model, PeftModel)
    base = model.get_base_model() if wrapped else model
    adapter_name = _check_adapter_name(adapter_name, model if wrapped else None)
    modules = TARGETS[target]
    shapes = {name: _projection_shape(base, name) for name in modules}
    dim = _projection_shape(base, "text_projection")[0] if hasattr(base, "text_projection") else None
    dim = dim or next(iter(shapes.values()))[0]

    if text_embeds is not None:
        forget = _check_embeddings(text_embeds, dim, "text_embeds")
        if classes is None:
            classes = [f"<embedding {i}>" for i in range(forget.shape[0])]
        classes = validate_class_names(classes)
        if len(classes) != forget.shape[0]:
            raise ValueError(f"`classes` names {len(classes)} classes but `text_embeds` has {forget.shape[0]} rows.")
    else:
        classes = validate_class_names(classes)
    if retain_classes is not None:
        retain_classes = validate_class_names(retain_classes, "retain_classes")
        overlap = sorted(set(classes) & set(retain_classes))
        if overlap:
            raise ValueError(f"{overlap} are both forgotten and retained; a class must be in only one of the lists.")
    plan = None
    if domain_aware:
        plan = plan_domain_edit(
            classes, domains=domains, retain_domains=retain_domains, retain_classes=retain_classes, paradigm=paradigm
        )
        for domain in {cell.domain for cell in plan.forget + plan.retain} - {None}:
            templates_of_domain(domain, domain_templates)  # unknown overrides and bad domain names fail here

    has_retain = retain_classes is not None or retain_text_embeds is not None or bool(plan and plan.retain)
    if keep_shared_direction is None:
        # with prototypes, the text-side shared direction would keep the forgotten class's share while the
        # prototypes' image-side common component is removed from every image (measured in docs/domains.md)
        keep_shared_direction = has_retain and target != "text" and not prototypes
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

    templates = resolve_templates(templates)
    needs_text_tower = (
        text_embeds is None or target != "visual" or (retain_classes is not None and retain_text_embeds is None)
    )
    if needs_text_tower:
        tokenizer = resolve_tokenizer(base, tokenizer)
        check_tokenizer_fits(base, tokenizer)
    prototype_settings = dict(prototype_options or {})
    if prototypes or retain_prototypes:
        unknown = sorted(set(prototype_settings) - PROTOTYPE_OPTIONS)
        if unknown:
            raise ValueError(f"Unknown `prototype_options` {unknown}; accepted: {sorted(PROTOTYPE_OPTIONS)}.")
        image_processor = _resolve_image_processor(base, image_processor)

    def embed(names: list[str], cell_templates: list[str] = templates) -> Tensor:
        return class_text_embeddings(
            base, tokenizer, names, cell_templates, average_templates, batch_size, show_progress
        ).embeddings

    def embed_cells(cells: Sequence[DomainCell]) -> Tensor:
        by_domain: dict[str | None, list[str]] = {}
        for cell in cells:
            by_domain.setdefault(cell.domain, []).append(cell.class_name)
        return torch.cat(
            [
                embed(names, templates if domain is None else templates_of_domain(domain, domain_templates))
                for domain, names in by_domain.items()
            ]
        )

    def prototype_embeddings(rows: Tensor, count: int) -> Tensor:
        found = synthesize_prototypes(
            base, rows, per_target=count, show_progress=show_progress, **_prototype_geometry(image_processor),
            **prototype_settings,
        )  # fmt: skip
        return found.embeddings.to(rows.dtype)

    context = model.base_model.edits_bypassed() if wrapped else contextlib.nullcontext()
    with context, torch.no_grad():
        retain = None
        if plan is not None:
            forget = embed_cells(plan.forget)
            retain = embed_cells(plan.retain) if plan.retain else None
            if retain_prototypes and retain is not None:
                retain = torch.cat([retain, prototype_embeddings(retain, retain_prototypes)])
            if prototypes:
                forget = torch.cat([forget, prototype_embeddings(forget, prototypes)])
        else:
            if text_embeds is None:
                forget = embed(classes)
            if retain_text_embeds is not None:
                retain = _check_embeddings(retain_text_embeds, dim, "retain_text_embeds")
            elif retain_classes is not None:
                retain = embed(retain_classes)
        anchor = None
        if target != "visual":
            # the bare templates ("a photo of a ."): where forgotten prompts are sent on the text side
            anchor = normalize_rows(
                encode_prompts(base, tokenizer, [t.format("") for t in templates], batch_size, False)
            )
            anchor = normalize_rows(anchor.mean(dim=0, keepdim=True)) if average_templates else anchor

    factors: dict[str, EditFactors] = {}
    if "visual_projection" in modules:
        factors["visual_projection"] = build_edit_factors(
            method,
            forget,
            retain,
            rtol=rank_tolerance,
            keep_shared_direction=keep_shared_direction,
        )
    if "text_projection" in modules:
        factors["text_projection"] = build_edit_factors(method, forget, retain, anchor, rtol=rank_tolerance)

    config = ProjectionEditConfig(
        target_modules=list(modules),
        method=method,
        alpha=float(alpha),
        ccup_lambda=float(ccup_lambda),
        ccup_mu=float(ccup_mu),
        keep_shared_direction=bool(keep_shared_direction),
        paradigm=plan.paradigm if plan is not None else "global",
        domains=list(domains or []),
        retain_domains=list(retain_domains or []),
        domain_templates={
            domain: templates_of_domain(domain, domain_templates)
            for domain in dict.fromkeys(c.domain for c in (plan.forget + plan.retain if plan else ()) if c.domain)
        },
        prototypes=int(prototypes),
        retain_prototypes=int(retain_prototypes),
        prototype_options=prototype_settings if (prototypes or retain_prototypes) else {},
        rank_pattern={name: int(f.forget.shape[1]) for name, f in factors.items()},
        retain_rank_pattern={name: int(f.retain.shape[1]) for name, f in factors.items() if f.retain is not None},
        projection_shapes={name: list(shape) for name, shape in shapes.items()},
        forgotten_classes=list(classes),
        retain_classes=list(retain_classes or []),
        templates=list(templates),
        average_templates=bool(average_templates),
        rank_tolerance=float(rank_tolerance),
        embedding_source="text_embeds" if text_embeds is not None else "class_names",
        base_model_name_or_path=(getattr(base, "name_or_path", None) or None),
        base_fingerprints=_base_fingerprints(model, base),
        base_model_revision=getattr(base.config, "_commit_hash", None),
        provenance=_provenance(),
    )
    return _AdapterPlan(adapter_name, config, {name: (f.forget, f.retain) for name, f in factors.items()})


def _base_fingerprints(model, base) -> dict[str, dict]:
    """Fingerprints of both projection weights as they are without any forget edit."""
    fingerprints = {}
    for name in ("visual_projection", "text_projection"):
        if not isinstance(getattr(base, name, None), nn.Module):
            continue
        weight = model.base_model.unedited_weight(name) if isinstance(model, PeftModel) else getattr(base, name).weight
        fingerprints[name] = fingerprint_weight(weight).to_dict()
    return fingerprints


def _provenance() -> dict:
    import huggingface_hub
    import peft
    import transformers

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "versions": {
            "hf_clip_forget": __version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__,
        },
    }


def holds_forget_adapters(model) -> bool:
    """A PeftModel whose adapters are all forget adapters (a ForgetPeftModel, or a PeftModel loaded by peft)."""
    return isinstance(model, PeftModel) and all(
        isinstance(config, ProjectionEditConfig) for config in model.peft_config.values()
    )


def _check_adapter_name(adapter_name: str | None, wrapped: PeftModel | None) -> str:
    existing = set(wrapped.peft_config) if wrapped is not None else set()
    if adapter_name is None:
        if not existing:
            return "default"
        index = len(existing)
        while f"forget_{index}" in existing:
            index += 1
        return f"forget_{index}"
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without '.' or '/', got {adapter_name!r}.")
    if adapter_name in existing:
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists (adapters: {sorted(existing)}). Choose another "
            "`adapter_name`, or `delete_adapter` the old one first."
        )
    return adapter_name


def _projection_shape(model: nn.Module, name: str) -> tuple[int, int]:
    layer = getattr(model, name, None)
    if isinstance(layer, ProjectionEditLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no `{name}` nn.Linear layer, so it is not a CLIP-style dual encoder that "
            "forget adapters can edit. Use a CLIPModel or VisionTextDualEncoderModel (or a model with "
            "`visual_projection`/`text_projection` layers)."
        )
    return layer.out_features, layer.in_features


def _check_embeddings(embeds, dim: int, argument: str) -> Tensor:
    if not isinstance(embeds, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor of shape (n, {dim}), got {type(embeds).__name__}.")
    if embeds.ndim != 2 or embeds.shape[1] != dim or embeds.shape[0] == 0:
        raise ValueError(
            f"`{argument}` must have shape (n, {dim}) — one row per class in the model's {dim}-dimensional "
            f"embedding space — got {tuple(embeds.shape)}."
        )
    if not torch.isfinite(embeds).all():
        raise ValueError(f"`{argument}` contains NaN or inf values; every embedding must be finite.")
    if (embeds.norm(dim=1) == 0).any():
        raise ValueError(f"`{argument}` contains an all-zero row, which has no direction to forget.")
    return normalize_rows(embeds)


PROTOTYPE_OPTIONS = {"steps", "learning_rate", "grid", "tv_weight", "jitter", "batch_size", "seed"}


def _resolve_image_processor(model, image_processor):
    if image_processor is not None:
        if not callable(image_processor) or not hasattr(image_processor, "image_mean"):
            raise TypeError(
                f"`image_processor` must be a transformers image processor, got {type(image_processor).__name__}."
            )
        return image_processor
    from transformers import AutoImageProcessor

    return load_from_model_checkpoint(model, AutoImageProcessor, "image_processor")


def _prototype_geometry(image_processor) -> dict[str, Any]:
    """Input size and normalisation of the model's images, from its image processor."""
    size = None
    for attribute in ("crop_size", "size"):
        value = getattr(image_processor, attribute, None)
        value = dict(value) if value is not None and not isinstance(value, int) else value
        if isinstance(value, int):
            size = value
        elif value:
            size = value.get("height") or value.get("shortest_edge")
        if size:
            break
    if not size:
        raise ValueError("Could not read the input size from `image_processor` (crop_size/size); pass another one.")
    return {"image_size": int(size), "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std)}  # fmt: skip


def resolve_tokenizer(model, tokenizer):
    """``tokenizer`` if given (checked to be a tokenizer), else the one saved with ``model``'s checkpoint."""
    if tokenizer is not None:
        if not callable(tokenizer) or not hasattr(tokenizer, "__len__"):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        return tokenizer
    from transformers import AutoTokenizer

    return load_from_model_checkpoint(model, AutoTokenizer, "tokenizer")


def load_from_model_checkpoint(model, auto_class, argument: str):
    """``auto_class.from_pretrained`` of the checkpoint ``model`` was loaded from (its tokenizer, image processor…),
    with an error that says to pass ``argument=`` when there is no checkpoint or loading fails."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    source = getattr(base, "name_or_path", None)
    what = argument.replace("_", " ")
    if not source:
        raise ValueError(
            f"Pass `{argument}=` (e.g. `{auto_class.__name__}.from_pretrained(<model id>)`): the model was not loaded "
            f"from a checkpoint, so its {what} cannot be found."
        )
    try:
        return auto_class.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(
            f"Could not load the {what} of {source!r} ({error}). Pass `{argument}=` explicitly."
        ) from error


@contextlib.contextmanager
def _quiet_peft_wrapping():
    # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.23 with a FutureWarning that
    # says nothing useful to our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _saved_adapters(model_id: str, root_name: str, **hub_kwargs) -> list[tuple[str, str | None]]:
    """``(adapter name, subfolder)`` of every forget adapter saved under ``model_id`` (root first)."""
    if os.path.isdir(model_id):
        config_paths = [
            os.path.relpath(os.path.join(directory, ADAPTER_CONFIG_NAME), model_id)
            for directory, _, files in os.walk(model_id)
            if ADAPTER_CONFIG_NAME in files
        ]

        def read(path: str) -> dict:
            with open(os.path.join(model_id, path)) as handle:
                return json.load(handle)

    else:
        from huggingface_hub import hf_hub_download, list_repo_files

        try:
            files = list_repo_files(model_id, **{k: v for k, v in hub_kwargs.items() if k != "cache_dir"})
        except Exception:  # noqa: BLE001 - let peft raise its usual error for an unreachable source
            return []
        config_paths = [f for f in files if f == ADAPTER_CONFIG_NAME or f.endswith("/" + ADAPTER_CONFIG_NAME)]

        def read(path: str) -> dict:
            with open(hf_hub_download(model_id, path, **hub_kwargs)) as handle:
                return json.load(handle)

    entries = []
    for path in sorted(config_paths, key=lambda p: (p.count("/"), p)):
        subfolder = os.path.dirname(path).replace(os.sep, "/")
        if subfolder.count("/") > 0:
            continue  # only the root and direct subfolders, as save_pretrained writes them
        if read(path).get("peft_type") not in (SAVED_PEFT_TYPE, PEFT_TYPE.value):
            continue
        entries.append((root_name, None) if not subfolder else (subfolder, subfolder))
    return entries


#: Entries a saved adapter directory consists of; anything else found in an existing directory is kept.
_ADAPTER_FILES = ("README.md", ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin")


def write_directory_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(staging)`` on a fresh directory beside ``target``, then make it ``target``.

    Until ``write`` has finished, ``target`` is untouched; if it fails, the staging directory is removed and the
    error propagates. An existing ``target`` is replaced as a whole (so no file of an earlier save survives next to
    the new ones), except for entries that are not part of a saved model or adapter, which are carried over.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.isfile(target):
        raise ValueError(f"Cannot save into {target!r}: it is a file, not a directory.")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.saving-", dir=parent)
    try:
        write(staging)
        if os.path.isdir(target):
            for entry in os.listdir(target):
                source = os.path.join(target, entry)
                if _is_saved_artifact(source) or os.path.exists(os.path.join(staging, entry)):
                    continue
                copy = shutil.copytree if os.path.isdir(source) and not os.path.islink(source) else shutil.copy2
                copy(source, os.path.join(staging, entry))
            retired = staging.replace(".saving-", ".replaced-")
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_saved_artifact(path: str) -> bool:
    name = os.path.basename(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))
    return (
        name in _ADAPTER_FILES
        or name.endswith((".safetensors", ".safetensors.index.json"))
        or name
        in (
            "config.json",
            "generation_config.json",
        )
    )


def _model_method(self, classes=None, tokenizer=None, **options):
    return add_forget_adapter(self, classes, tokenizer, **options)


_model_method.__doc__ = add_forget_adapter.__doc__
_model_method.__name__ = "add_forget_adapter"


def install_model_methods() -> None:
    """Give ``CLIPModel`` and ``VisionTextDualEncoderModel`` an ``add_forget_adapter`` method (idempotent; an
    existing attribute of that name is never replaced)."""
    from transformers import CLIPModel, VisionTextDualEncoderModel

    for model_cls in (CLIPModel, VisionTextDualEncoderModel):
        if not hasattr(model_cls, "add_forget_adapter"):
            model_cls.add_forget_adapter = _model_method
