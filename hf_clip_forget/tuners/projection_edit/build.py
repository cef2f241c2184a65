"""Building a forget adapter from its config: class names → text embeddings → the thin factors of each layer.

The config is the whole request: which classes, templates, method and strength, domains and prototypes. Every
entry point builds through :func:`build_adapter` — ``add_forget_adapter``, and peft's own ``get_peft_model``,
``PeftModel.add_adapter``, ``inject_adapter_in_model`` and transformers' ``model.add_adapter(config)`` (through
:meth:`ProjectionEditModel.inject_adapter`) — and :func:`~hf_clip_forget.api.verify_forget_adapter` rebuilds through
it to check stored factors. Nothing here modifies the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core import EditFactors, build_edit_factors, resolve_templates
from ...core import domain_templates as templates_of_domain
from ...core.domains import default_ccup_mu
from ...core.fingerprint import TowerFingerprint, WeightFingerprint, fingerprint_tensors, fingerprint_weight
from ...core.prompt_cache import prompt_cache_disabled
from ...core.text_path import unedited_tensors
from ...core.tokenizer_checks import check_tokenizer_matches_model, warn_about_poorly_tokenized_classes
from ...families import family_of
from .config import ProjectionEditConfig
from .embedder import Embedder, Embeddings, domain_aware
from .estimate import effect_record, estimate_built_effect, may_be_weak, warn_if_weak
from .integrity import tensor_sha256
from .layer import ProjectionEditLayer
from .logit_factors import logit_edit_factors
from .neighbours import with_neighbour_names
from .preprocessors import resolve_tokenizer
from .provenance import base_model_source, provenance, shareable_model_id


PROTOTYPE_OPTIONS = {"steps", "learning_rate", "grid", "tv_weight", "jitter", "batch_size", "seed"}


@dataclass(frozen=True)
class BuildInputs:
    """What building needs besides the config and the model (never saved).

    Attributes:
        tokenizer: the model's tokenizer; loaded from the model's checkpoint when ``None``.
        image_processor: the model's image processor (prototypes only); loaded from the checkpoint when ``None``.
        text_embeds: ``(n, d)`` embeddings to forget (configs with ``embedding_source="text_embeds"``).
        retain_text_embeds: ``(r, d)`` embeddings to keep instead of embedding ``retain_classes``.
        batch_size: prompts per text-tower batch.
        show_progress: progress bars while embedding prompts and synthesising prototypes.
        use_cache: take prompt embeddings from the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``);
            ``False`` encodes every prompt of the build (neighbour search and tokenizer checks included) anew.
        estimate_effect: for an uncalibrated domain-specific or text-side edit (the kinds whose effect the
            directions alone do not settle), estimate the effect data-free (:mod:`hf_clip_forget.core.effect`), record
            it in ``provenance["effect_estimate"]`` and warn (:class:`~.estimate.WeakEditWarning`) when it is
            predicted to change little; ``False`` (a rebuild that only checks factors) skips both. A global
            image-side edit removes the forgotten prompts' span itself and gets no estimate (its 20 extra prompts
            per class would double a first edit's cost).
    """

    tokenizer: Any = None
    image_processor: Any = None
    text_embeds: Tensor | None = None
    retain_text_embeds: Tensor | None = None
    batch_size: int = 256
    show_progress: bool = True
    use_cache: bool = True
    estimate_effect: bool = True


@dataclass(frozen=True)
class BuiltAdapter:
    """A built adapter: its config with every derived field filled (ranks, shapes, fingerprints, templates) and
    the factors of each wrapped layer, ``{module name: (forget, retain or None)}``."""

    config: ProjectionEditConfig
    factors: dict[str, tuple[Tensor, Tensor | None]]


def build_adapter(model: nn.Module, config: ProjectionEditConfig, inputs: BuildInputs = BuildInputs()) -> BuiltAdapter:
    """Compute the adapter ``config`` describes on ``model`` (a transformers dual encoder, possibly holding other
    forget layers, whose edits are bypassed while embedding). Raises before computing anything on bad input.

    A config whose ``ccup_mu`` is ``None`` gets its paradigm's default (:func:`~hf_clip_forget.core.domains.
    default_ccup_mu`), and the built config records the value used."""
    family_of(model)
    if config.ccup_mu is None:
        config = dataclasses.replace(config, ccup_mu=default_ccup_mu(config.paradigm))
    modules = target_projections(model, config)
    _check_request(config, inputs)
    if config.method == "logit" and any(family_of(model).is_text_side(name) for name in modules):
        raise ValueError(
            "method='logit' edits the image side only (its guarantee — no other class's logit moves — holds for image "
            "embeddings scored against the class prompts). Use target='visual', or method='ccup' for the text side."
        )
    with contextlib.nullcontext() if inputs.use_cache else prompt_cache_disabled():
        return _build(model, config, inputs, modules)


def _build(model: nn.Module, config: ProjectionEditConfig, inputs: BuildInputs, modules) -> BuiltAdapter:
    """:func:`build_adapter` once the request is checked (and the prompt cache bypassed if asked)."""
    tokenizer = None
    if _needs_text_tower(model, config, inputs, modules):
        tokenizer = resolve_tokenizer(model, inputs.tokenizer)
        check_tokenizer_matches_model(model, tokenizer, explicit=inputs.tokenizer is not None)
        warn_about_poorly_tokenized_classes(
            tokenizer, [*config.forgotten_classes, *config.retain_classes], _all_templates(model, config)
        )
    text_side = {name: family_of(model).is_text_side(name) for name in modules}
    with _edits_bypassed(model), torch.no_grad():
        config = with_neighbour_names(model, config, tokenizer, inputs.batch_size, inputs.show_progress)
        embedder = Embedder(model, config, inputs, tokenizer, projection_shape(model, family_of(model).text.module)[0])
        embeddings = embedder.embeddings(modules)
        factors = {name: _module_factors(text_side[name], config, embeddings, embedder) for name in modules}
        empty = [name for name, f in factors.items() if f.forget.shape[1] == 0]
        if empty:
            raise ValueError(
                f"Nothing to forget: the edit of {empty} has rank 0 (every forget direction fell below "
                f"rank_tolerance={config.rank_tolerance} or was kept). An adapter that changes nothing is refused; "
                "check the classes, `rank_tolerance` (in (0, 1), default 1e-5) and `retain_classes`."
            )
        estimate = inputs.estimate_effect and may_be_weak(config, any(text_side.values()))
        effect = estimate_built_effect(embedder, embeddings, config, factors, text_side) if estimate else None
    filled = _filled_config(model, config, embeddings.templates, modules, factors)
    if effect is not None:
        filled = dataclasses.replace(
            filled, provenance={**filled.provenance, "effect_estimate": effect_record(filled, effect)}
        )
        warn_if_weak(filled, effect, any(text_side.values()))
    return BuiltAdapter(filled, {name: (f.forget, f.retain) for name, f in factors.items()})


def is_built(config: ProjectionEditConfig) -> bool:
    """Whether ``config`` describes computed factors (a saved or built adapter) rather than a request."""
    return bool(config.rank_pattern)


def can_build(config: ProjectionEditConfig) -> bool:
    """Whether ``config`` alone (with the model's own tokenizer) is enough to compute its edit."""
    return config.embedding_source == "class_names" and bool(config.forgotten_classes)


def target_projections(model: nn.Module, config: ProjectionEditConfig) -> tuple[str, ...]:
    """The projection layers ``config`` edits (by attribute name), checked to exist on ``model``."""
    family = family_of(model)
    allowed = set(family.projections.values())
    targets = config.target_modules or [family.image.module]
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    unknown = sorted(set(targets) - allowed)
    if unknown:
        raise ValueError(
            f"`target_modules` {unknown} are not projection layers of a {family.name} model; forget adapters edit "
            f"only {sorted(allowed)} (the layers whose outputs are the joint embeddings)."
        )
    for name in targets:
        if is_mergeable_side(family, name):
            projection_shape(model, name)
        elif _submodule(model, name) is None:
            raise ValueError(
                f"{type(model).__name__} has no `{name}` module, where its {family.name} embedding is made."
            )
    return tuple(targets)


def is_mergeable_side(family, name: str) -> bool:
    """Whether the family's layer ``name`` is an ``nn.Linear`` whose edit can be merged into its weights."""
    side = family.text if family.is_text_side(name) else family.image
    return side.mergeable


def projection_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of projection ``name``; a clear error when it is not an ``nn.Linear``."""
    layer = _submodule(model, name)
    if isinstance(layer, ProjectionEditLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no `{name}` nn.Linear layer, so it is not a CLIP-style dual encoder that "
            "forget adapters can edit."
        )
    return layer.out_features, layer.in_features


def _check_request(config: ProjectionEditConfig, inputs: BuildInputs) -> None:
    if isinstance(inputs.batch_size, bool) or not isinstance(inputs.batch_size, int) or inputs.batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer (prompts per batch), got {inputs.batch_size!r}.")
    from_vectors = config.embedding_source == "text_embeds"
    if from_vectors and inputs.text_embeds is None:
        raise ValueError(
            "This config forgets precomputed text embeddings (embedding_source='text_embeds'), which a config does "
            "not hold: build it with `add_forget_adapter(model, text_embeds=...)`, or load the saved adapter with "
            "`ForgetPeftModel.from_pretrained`."
        )
    if not from_vectors and not config.forgotten_classes:
        raise ValueError(
            "This ProjectionEditConfig names no `forgotten_classes`, so there is no edit to build. Name the classes "
            "(`ProjectionEditConfig(forgotten_classes=['dog'])`) or use `hf_clip_forget.add_forget_adapter`."
        )
    if from_vectors and (config.expand_neighbours or config.neighbour_names):
        raise ValueError(
            "`expand_neighbours` searches words near the forgotten class *names*; with `text_embeds` there are no "
            "names. Pass class names, or drop `expand_neighbours`."
        )
    if (config.expand_neighbours or config.neighbour_names) and domain_aware(config):
        raise ValueError(
            "`expand_neighbours` forgets the neighbour words everywhere, which a domain-aware edit (domains, "
            "paradigm, prototypes) would contradict. Drop `expand_neighbours`, or forget globally."
        )
    if domain_aware(config) and from_vectors:
        raise ValueError(
            "Domains and prototypes are built from class names; they cannot be combined with `text_embeds`. Pass "
            "class names, or drop the domain and prototype options."
        )
    has_retain = bool(config.retain_classes) or inputs.retain_text_embeds is not None or config.paradigm == "domain"
    if config.keep_shared_direction and not has_retain:
        raise ValueError(
            "`keep_shared_direction=True` needs `retain_classes`: the shared direction is the mean of all named "
            "classes (forget and retain). Pass the other classes the model should keep recognising."
        )
    _check_logit_request(config, inputs)
    unknown = sorted(set(config.prototype_options) - PROTOTYPE_OPTIONS)
    if unknown:
        raise ValueError(f"Unknown `prototype_options` {unknown}; accepted: {sorted(PROTOTYPE_OPTIONS)}.")


def _check_logit_request(config: ProjectionEditConfig, inputs: BuildInputs) -> None:
    """``method="logit"`` lowers class logits relative to the other candidates, on the image side, from class names."""
    if config.method != "logit":
        return
    if not config.retain_classes:
        raise ValueError(
            "method='logit' lowers the forgotten classes' logits below the other candidates', so it must know them: "
            "pass `retain_classes` (the other classes you classify among), or use method='ccup' / 'nullspace'."
        )
    if config.embedding_source != "class_names" or inputs.retain_text_embeds is not None:
        raise ValueError(
            "method='logit' is built from class names (its classifier is each class's prompts); it cannot use "
            "`text_embeds` / `retain_text_embeds`. Pass the class names, or use method='ccup' / 'nullspace'."
        )
    if config.prototypes or config.retain_prototypes or config.expand_neighbours or config.neighbour_names:
        raise ValueError(
            "method='logit' is built from prompts only: `prototypes`, `retain_prototypes` and `expand_neighbours` are "
            "not supported with it. Drop them, or use method='ccup'."
        )


def _needs_text_tower(model, config: ProjectionEditConfig, inputs: BuildInputs, modules: Sequence[str]) -> bool:
    return (
        inputs.text_embeds is None
        or family_of(model).text.module in modules
        or (bool(config.retain_classes) and inputs.retain_text_embeds is None)
    )


def _all_templates(model, config: ProjectionEditConfig) -> list[str]:
    templates = resolve_templates(
        config.templates or family_of(model).templates_for(config.target_modules or "visual")
    )
    return [
        *templates,
        *(t for domain in config.domains for t in templates_of_domain(domain, config.domain_templates)),
    ]


def _module_factors(text_side: bool, config: ProjectionEditConfig, embeddings: Embeddings, embedder) -> EditFactors:
    if config.method == "logit":
        return logit_edit_factors(embedder, embeddings, config)
    if text_side:
        return build_edit_factors(
            config.method, embeddings.forget, embeddings.retain, embeddings.anchor, rtol=config.rank_tolerance,
            extra_forget_embeds=embeddings.neighbours,
        )  # fmt: skip
    return build_edit_factors(
        config.method,
        embeddings.forget,
        embeddings.retain,
        rtol=config.rank_tolerance,
        keep_shared_direction=config.keep_shared_direction,
        extra_forget_embeds=embeddings.neighbours,
    )


def _filled_config(model, config, templates, modules, factors: dict[str, EditFactors]) -> ProjectionEditConfig:
    domains = dict.fromkeys([*config.domains, *config.retain_domains])
    return dataclasses.replace(
        config,
        target_modules=list(modules),
        templates=list(templates),
        domain_templates={domain: templates_of_domain(domain, config.domain_templates) for domain in domains},
        rank_pattern={name: int(f.forget.shape[1]) for name, f in factors.items()},
        retain_rank_pattern={name: int(f.retain.shape[1]) for name, f in factors.items() if f.retain is not None},
        projection_shapes={
            name: list(projection_shape(model, name)) for name in modules if is_mergeable_side(family_of(model), name)
        },
        mergeable=all(is_mergeable_side(family_of(model), name) for name in modules),
        base_model_name_or_path=base_model_source(model, config.base_model_name_or_path),
        tokenizer_name_or_path=shareable_model_id(config.tokenizer_name_or_path),
        base_fingerprints=base_fingerprints(model),
        factor_checksums={
            f"{name}.{role}": tensor_sha256(factor)
            for name, f in factors.items()
            for role, factor in (("forget", f.forget), ("retain", f.retain))
            if factor is not None
        },
        base_model_revision=getattr(model.config, "_commit_hash", None),
        provenance=provenance(),
    )


#: Key prefix of a tower's entry in ``base_fingerprints`` (``"tower:text_model"``).
TOWER_KEY = "tower:"


def base_fingerprints(model: nn.Module) -> dict[str, dict]:
    """What the edit depends on, as ``ProjectionEditConfig.base_fingerprints`` records it: each projection weight
    as it is without any forget edit (:class:`~hf_clip_forget.core.fingerprint.WeightFingerprint`, exact hash and
    sketch), and every other top-level module of ``model`` — the towers that embedded the prompts and prototypes —
    as a :class:`~hf_clip_forget.core.fingerprint.TowerFingerprint` (a fixed sample of each tensor), under
    ``"tower:<module>"``."""
    fingerprints = {}
    for name in family_of(model).projections.values():
        layer = _submodule(model, name)
        if isinstance(layer, ProjectionEditLayer) and layer.mergeable:
            fingerprints[name] = fingerprint_weight(layer.unedited_weight()).to_dict()
        elif isinstance(layer, nn.Linear):
            fingerprints[name] = fingerprint_weight(layer.weight).to_dict()
    for name, child in model.named_children():
        tensors = unedited_tensors(child)
        if name not in fingerprints and tensors:
            fingerprints[TOWER_KEY + name] = fingerprint_tensors(tensors).to_dict()
    return fingerprints


def fingerprint_from_record(key: str, record: dict) -> WeightFingerprint | TowerFingerprint:
    """The fingerprint object of one ``base_fingerprints`` entry; a ``ValueError`` naming the entry when it is not
    one this library writes."""
    try:
        if key.startswith(TOWER_KEY):
            return TowerFingerprint.from_dict(record)
        return WeightFingerprint.from_dict(record)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"`base_fingerprints[{key!r}]` is not a fingerprint this library writes ({error!r}); the adapter config "
            "is corrupt or was altered."
        ) from None


def fingerprint_mismatches(model: nn.Module, recorded: dict[str, dict]) -> tuple[list[str], list[str]]:
    """``(mismatching, missing)``: the entries of ``recorded`` that ``model`` does not match (or lacks), and the
    entries this library records for ``model`` that ``recorded`` does not hold."""
    actual = base_fingerprints(model)
    mismatching = []
    for key, record in recorded.items():
        expected = fingerprint_from_record(key, record)
        found = actual.get(key)
        if found is None or not expected.matches(fingerprint_from_record(key, found)):
            mismatching.append(key)
    return mismatching, sorted(set(actual) - set(recorded))


@contextlib.contextmanager
def _edits_bypassed(model: nn.Module):
    """Embed with the unedited projections, whatever forget layers ``model`` already holds."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, ProjectionEditLayer):
                stack.enter_context(module.edits_bypassed())
        yield


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
