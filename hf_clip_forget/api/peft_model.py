"""``ForgetPeftModel``: the ``peft.PeftModel`` of a stack of forget adapters."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from peft import PeftModel
from torch import nn

from ..files import write_directory_atomically
from ..tuners.projection_edit import ProjectionEditConfig, loading_whole_stack
from ..tuners.projection_edit.integrity import adapter_is_unset, restored_on_failure
from ..tuners.projection_edit.layer import refuse_mixed_batch
from ..tuners.projection_edit.schema import LOAD_OPTIONS
from .saved import check_forget_peft_type, check_loaded_factors, factor_checksums, read_adapter_config, saved_adapters


#: peft saves the adapter of this name at the root of a directory, every other one in a subfolder of its name.
ROOT_ADAPTER = "default"


class ForgetPeftModel(PeftModel):
    """A :class:`peft.PeftModel` holding a stack of forget adapters on a dual encoder.

    Everything of ``PeftModel`` works as usual (``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``,
    ``unload``, ``delete_adapter``, ``disable_adapter``, ``save_pretrained``, ``get_image_features``…). In addition:

    * ``add_forget_adapter`` (installed by :mod:`hf_clip_forget.api.adding`, which builds adapters) adds another
      named adapter; all added adapters are active together and their combined effect is the union of their
      forget subspaces;
    * :meth:`set_adapter` accepts a list of names;
    * :meth:`save_pretrained` records the stack and a checksum of every factor; :meth:`from_pretrained` loads every
      adapter of a saved stack and activates them all, and :meth:`load_adapter` refuses factors that are not
      finite, never set, or differ from their checksums;
    * :meth:`verify` recomputes each adapter from its recorded classes and compares;
    * :attr:`forgotten_classes` says what each adapter forgets.
    """

    #: Writes ``README.md`` into a save directory: ``writer(model, directory, merged=False)``. The Hub layer
    #: (:mod:`hf_clip_forget.hub`, which imports this module) plugs its model card in here; without it peft's
    #: generic card is written.
    model_card_writer: ClassVar[Callable[..., None] | None] = None
    #: Uploads a model to the Hub: ``uploader(model, repo_id, **options)``; plugged in by :mod:`hf_clip_forget.hub`.
    hub_uploader: ClassVar[Callable[..., Any] | None] = None
    #: Audits the adapters: ``auditor(model, tokenizer, **options)``; plugged in by ``hf_clip_forget`` (the audit
    #: imports the evaluation layer, above this one).
    auditor: ClassVar[Callable[..., Any] | None] = None

    def audit_forgetting(self, tokenizer=None, **options):
        """Try to get the forgotten classes back (held-out prompts, neighbour names, retrieval, a linear probe) and
        report before/after numbers with a verdict per probe; see :func:`hf_clip_forget.audit.audit_forgetting`."""
        auditor = type(self).auditor
        if auditor is None:
            raise RuntimeError("The audit is not loaded: `import hf_clip_forget` (it plugs the audit in).")
        return auditor(self, tokenizer, **options)

    def verify(self, tokenizer=None, image_processor=None, **options):
        """Recompute every adapter from its recorded classes and settings and compare with the stored factors; see
        :func:`~hf_clip_forget.verify_forget_adapter`."""
        from .verify import verify_forget_adapter

        return verify_forget_adapter(self, tokenizer=tokenizer, image_processor=image_processor, **options)

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

    def add_adapter(self, adapter_name: str, peft_config, *args, **kwargs) -> None:
        """``PeftModel.add_adapter``, without peft's warning about names contained in the prefix
        ``projection_edit_`` (``"c"``, ``"edit"``): the adapter state is mapped structurally, so such names save
        and load exactly."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Adapter name .* should not be contained in the prefix")
            super().add_adapter(adapter_name, peft_config, *args, **kwargs)

    def forward(self, *args, **kwargs):
        refuse_mixed_batch(kwargs.get("adapter_names"))
        return super().forward(*args, **kwargs)

    @property
    def get_image_features(self):
        """The base model's ``get_image_features`` (same signature) with the active edits; mixed-adapter batches
        (``adapter_names=``), which transformers would silently ignore, are refused."""
        return _refusing_mixed_batches(self.get_base_model().get_image_features)

    @property
    def get_text_features(self):
        """The base model's ``get_text_features`` (same signature) with the active edits; ``adapter_names=`` is
        refused."""
        return _refusing_mixed_batches(self.get_base_model().get_text_features)

    def create_or_update_model_card(self, output_dir: str) -> None:
        writer = type(self).model_card_writer
        if writer is None:
            return super().create_or_update_model_card(output_dir)
        writer(self, output_dir)

    # -------------------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters=None, *, audit=None, **kwargs
    ) -> None:
        """``PeftModel.save_pretrained``, with each adapter's config recording the checksums of its factors and,
        at the root of a stack, the names of all adapters saved together. Written atomically: a failure midway
        leaves the files of an earlier save as they were (see :func:`hf_clip_forget.files.write_directory_atomically`).
        ``audit``: a report of :meth:`audit_forgetting` on this model, shown in the card and saved as ``audit.json``.

        ``base_model_name_or_path`` is written as peft, LoRA and transformers' ``model.save_pretrained`` write it:
        where the base model was loaded from, a local directory included, so that ``PeftModel.from_pretrained`` and
        ``CLIPModel.from_pretrained(save_directory)`` find it. Only :meth:`push_to_hub` replaces a local directory,
        by the base's Hub id or ``null`` (see :mod:`hf_clip_forget.tuners.projection_edit.provenance`)."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)

        def write(staging: str) -> None:
            with self._configs_as_saved(names):
                # peft fills an unset base_model_name_or_path with the base model's name_or_path
                super(ForgetPeftModel, self).save_pretrained(staging, selected_adapters=selected_adapters, **kwargs)
            if audit is not None:
                self._write_card(staging, merged=False, audit=audit)

        write_directory_atomically(save_directory, write)

    @contextlib.contextmanager
    def _configs_as_saved(self, names: list[str]):
        """Temporarily give each saved adapter a config copy that records its checksums and the stack."""
        layers = self.base_model.forget_layers()
        originals = {name: self.peft_config[name] for name in names if name in self.peft_config}
        stack = sorted(originals, key=lambda name: (name != ROOT_ADAPTER, names.index(name)))
        for name, config in originals.items():
            saved = copy.copy(config)
            saved.factor_checksums = factor_checksums(layers, name)
            saved.stack = stack if name == ROOT_ADAPTER and len(stack) > 1 else []
            self.peft_config[name] = saved
        try:
            yield
        finally:
            self.peft_config.update(originals)

    def save_merged_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer=None,
        image_processor=None,
        processor=None,
        audit=None,
        **kwargs,
    ) -> None:
        """Save the full model with the active adapters merged into its weights, as a plain transformers checkpoint
        (``CLIPModel.from_pretrained(save_directory)`` loads it), with the given tokenizer and image processor (or
        ``processor``) so that ``pipeline("zero-shot-image-classification", model=save_directory)`` works. This
        model itself is not modified. Atomic, as :meth:`save_pretrained`; the card lists what was forgotten (and
        the ``audit``, as :meth:`save_pretrained`). Merged weights that would hold NaN or inf raise peft's
        ``ValueError`` ("NaNs detected in the merged weights. The adapter <name> seems to be broken") before anything
        is written. A merged checkpoint holds no adapter config, so no ``base_model_name_or_path``."""

        def write(staging: str) -> None:
            with self._merged_plain_layers():
                self.get_base_model().save_pretrained(staging, **kwargs)
            for preprocessor in (processor, tokenizer, image_processor):
                if preprocessor is not None:
                    preprocessor.save_pretrained(staging)
            self._write_card(staging, merged=True, audit=audit)

        write_directory_atomically(save_directory, write)

    def _write_card(self, directory: str, merged: bool, audit=None) -> None:
        writer = type(self).model_card_writer
        if writer is None:
            if audit is not None:
                raise RuntimeError("Model cards are not loaded: `import hf_clip_forget` (it loads the Hub layer).")
            return
        writer(self, directory, merged=merged, **({"audit": audit} if audit is not None else {}))

    def push_to_hub(self, repo_id: str, **options):
        """Upload the adapters (default) or, with ``merged=True``, the merged full model, with a model card
        listing what was forgotten, in one commit. See :func:`hf_clip_forget.hub.push_to_hub` for the options."""
        uploader = type(self).hub_uploader
        if uploader is None:
            raise RuntimeError("Hub support is not loaded: `import hf_clip_forget` (it loads hf_clip_forget.hub).")
        return uploader(self, repo_id, **options)

    @contextlib.contextmanager
    def _merged_plain_layers(self):
        """Temporarily replace every forget layer by a plain ``nn.Linear`` holding its merged weight: what its forward
        applies (the merged and the active adapters), computed and checked by ``merged_weight`` before anything is
        swapped or written — NaN or inf raise peft's ``ValueError`` ("NaNs detected in the merged weights. The
        adapter <name> seems to be broken")."""
        for layer in self.base_model.forget_layers().values():
            layer._refuse_merge()
        planned = []
        for name, layer in self.base_model.forget_layers().items():
            active = [n for n in self.active_adapters if n in layer.projection_edit_settings]
            if active or layer.merged:
                merged, bias = layer.merged_weight(active), layer.merged_bias(active)
            else:
                merged, bias = layer.unedited_weight().clone(), layer.unedited_bias()
                bias = None if bias is None else bias.detach().clone()
            planned.append((name, layer, merged, bias))
        swapped = []
        try:
            for name, layer, merged, bias in planned:
                plain = nn.Linear(
                    layer.in_features,
                    layer.out_features,
                    bias=bias is not None,
                    device=merged.device,
                    dtype=merged.dtype,
                )
                plain.weight.data = merged
                if bias is not None:
                    plain.bias.data = bias
                parent_name, _, child = name.rpartition(".")
                parent = self.base_model.model.get_submodule(parent_name)
                setattr(parent, child, plain)
                swapped.append((parent, child, layer))
            yield
        finally:
            for parent, child, layer in swapped:
                setattr(parent, child, layer)

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model, model_id: str | os.PathLike, adapter_name: str = ROOT_ADAPTER, **kwargs):
        """Load a saved forget adapter — or every adapter of a saved stack — onto ``model``.

        Without ``subfolder`` (or ``config``), the adapter at the root of ``model_id`` (named ``adapter_name``) and
        one adapter per subfolder holding an ``adapter_config.json`` (named after the subfolder, as
        ``save_pretrained`` writes them) are loaded and all activated. ``model_id`` is a local directory or a Hub
        repo id. Adapters of other peft methods, and factors that are not finite or differ from their recorded
        checksums, are refused; on any failure ``model`` is left as it was.
        """
        with _quiet_peft_wrapping(), restored_on_failure(model):
            if "subfolder" in kwargs or "config" in kwargs:
                _check_single_adapter(model_id, kwargs)
                return super().from_pretrained(model, model_id, adapter_name=adapter_name, **kwargs)
            hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
            entries = saved_adapters(str(model_id), adapter_name, **hub_kwargs)
            if not entries:
                raise ValueError(
                    f"No adapter_config.json at {model_id} or in its subfolders: it holds no saved forget adapter."
                )
            return cls._load_stack(model, model_id, entries, kwargs)

    @classmethod
    def _load_stack(cls, model, model_id, entries: list[tuple[str, str | None]], kwargs: dict):
        (first_name, first_subfolder), rest = entries[0], entries[1:]
        first_kwargs = dict(kwargs, **({"subfolder": first_subfolder} if first_subfolder else {}))
        with loading_whole_stack():
            peft_model = super().from_pretrained(model, model_id, adapter_name=first_name, **first_kwargs)
        try:
            for name, subfolder in rest:
                load_kwargs = {k: v for k, v in kwargs.items() if k not in ("is_trainable", "config")}
                peft_model.load_adapter(model_id, adapter_name=name, subfolder=subfolder, **load_kwargs)
        except BaseException:
            peft_model.unload()  # leave the base model as it was
            raise
        peft_model.base_model.set_adapter([name for name, _ in entries], inference_mode=True)
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args, **kwargs):
        """``PeftModel.load_adapter``, refusing adapters of other peft methods before anything is allocated, and
        loaded factors that are non-finite, never set or differ from their recorded checksums (the adapter is then
        removed again and the error names it).

        Loading into an existing ``adapter_name`` replaces that adapter's factors *and* its config (what it
        forgets), so both keep saying the same thing; when the saved adapter differs in structure or settings
        (method, strength, ranks, targets) it is refused: load it under a new name or ``delete_adapter`` first.
        """
        hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
        location = {"subfolder": kwargs["subfolder"]} if kwargs.get("subfolder") else {}
        raw = read_adapter_config(str(model_id), location.get("subfolder"), **hub_kwargs)
        if raw is not None:
            check_forget_peft_type(raw, str(model_id))
        options = {name: kwargs.pop(name) for name in LOAD_OPTIONS if name in kwargs}
        previous = self.peft_config.get(adapter_name)
        source = (str(model_id), location.get("subfolder"), (hub_kwargs.get("revision") or "",))
        if previous is not None and previous.checked_source == source and adapter_is_unset(self, adapter_name):
            # the config peft's from_pretrained checked and injected a moment ago for this very load: already
            # checked (file, schema, fingerprints); the load gate checks the factors against it
            pass
        elif raw is not None and previous is not None:
            _check_same_settings(previous, raw, adapter_name)
            # the gate checks the incoming factors against the config they come with: install it first
            replacement = ProjectionEditConfig.from_pretrained(str(model_id), **location, **hub_kwargs, **options)
            self.base_model._check_new_adapter_config(replacement)  # shapes, ranks and base fingerprints
            self.peft_config[adapter_name] = replacement
        elif options:
            # peft's load_adapter does not pass config options on: inject with the options set, then load into it
            config = ProjectionEditConfig.from_pretrained(str(model_id), **location, **hub_kwargs, **options)
            self.add_adapter(adapter_name, config)
        try:
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
            check_loaded_factors(self.base_model.forget_layers(), adapter_name, self.peft_config[adapter_name])
        except BaseException:
            if previous is not None:
                self.peft_config[adapter_name] = previous
            else:
                self._discard(adapter_name)
            raise
        return result

    def _discard(self, adapter_name: str) -> None:
        """Remove an adapter that failed its checks; the last one takes the forget layers with it."""
        if adapter_name not in self.peft_config:
            return
        if set(self.peft_config) == {adapter_name}:
            self.base_model._unload_and_optionally_merge(merge=False)
            return
        for layer in self.base_model.forget_layers().values():
            if layer.merged:
                layer.unmerge()
        self.delete_adapter(adapter_name)


def _refusing_mixed_batches(method):
    @functools.wraps(method)  # keeps the signature: callers inspect it to pick the inputs it accepts
    def call(*args, **kwargs):
        refuse_mixed_batch(kwargs.pop("adapter_names", None))
        return method(*args, **kwargs)

    return call


#: Config fields that shape an adapter's layers and settings: loading into an existing name keeps those.
_STRUCTURE_FIELDS = (
    "method", "alpha", "ccup_lambda", "ccup_mu", "rank_tolerance", "rank_pattern", "retain_rank_pattern",
    "projection_shapes",
)  # fmt: skip


def _check_same_settings(current: ProjectionEditConfig, saved: dict, adapter_name: str) -> None:
    """peft's load into an existing name copies the factors into the existing layers and keeps their settings:
    refuse when the saved adapter's settings or shapes differ, since the result would be neither adapter."""
    differing = [name for name in _STRUCTURE_FIELDS if name in saved and saved[name] != getattr(current, name)]
    targets = saved.get("target_modules")
    if targets is not None and sorted([targets] if isinstance(targets, str) else targets) != sorted(
        current.target_modules or []
    ):
        differing.append("target_modules")
    if differing:
        raise ValueError(
            f"The adapter being loaded into the existing name {adapter_name!r} differs from it in {differing}; its "
            "factors cannot replace the existing ones. Load it under a new `adapter_name`, or "
            f"`delete_adapter({adapter_name!r})` first."
        )


def _check_single_adapter(model_id, kwargs: dict) -> None:
    """Refuse, before anything is loaded, one explicitly chosen adapter that is not a forget adapter."""
    config = kwargs.get("config")
    if config is not None:
        if not isinstance(config, ProjectionEditConfig):
            raise ValueError(
                f"`config` is a {type(config).__name__}, not a forget adapter's ProjectionEditConfig; load other peft "
                "methods with `peft.PeftModel.from_pretrained`."
            )
        return
    hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
    raw = read_adapter_config(str(model_id), kwargs.get("subfolder"), **hub_kwargs)
    if raw is not None:
        check_forget_peft_type(raw, str(model_id))


@contextlib.contextmanager
def _quiet_peft_wrapping():
    # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.23 with a FutureWarning that
    # says nothing useful to our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


__all__ = ["ROOT_ADAPTER", "ForgetPeftModel"]
