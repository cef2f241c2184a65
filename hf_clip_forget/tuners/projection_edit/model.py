from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...families import family_of
from .build import BuildInputs, build_adapter, can_build, fingerprint_mismatches, is_built
from .config import ProjectionEditConfig
from .integrity import adapter_is_unset, check_incoming_state, discard_adapter, factor_checksums, factors_of_model
from .layer import EditSettings, ProjectionEditLayer, refuse_mixed_batch
from .modules import Linear, OutputEdit
from .names import check_adapter_name
from .registration import PREFIX


#: Default target modules per transformers ``model_type``: the image side, where text-derived forget directions
#: remove a class from zero-shot recognition.
DEFAULT_TARGET_MODULES = {"clip": ["visual_projection"], "vision-text-dual-encoder": ["visual_projection"]}

#: Set while ``ForgetPeftModel.from_pretrained`` loads a whole saved stack (see :func:`loading_whole_stack`).
_LOADING_WHOLE_STACK: contextvars.ContextVar[bool] = contextvars.ContextVar("loading_whole_stack", default=False)


@contextlib.contextmanager
def loading_whole_stack():
    """Within this context, adapters saved as the root of a stack may be injected: the caller loads the rest."""
    token = _LOADING_WHOLE_STACK.set(True)
    try:
        yield
    finally:
        _LOADING_WHOLE_STACK.reset(token)


class ProjectionEditModel(BaseTuner):
    """The peft tuner of forget adapters: wraps the projection layers of a dual encoder with
    :class:`~hf_clip_forget.tuners.projection_edit.modules.Linear` forget layers (or
    :class:`~hf_clip_forget.tuners.projection_edit.modules.OutputEdit` where the family declares a module that is
    not an ``nn.Linear``).

    Compared with peft's generic tuner, merging is atomic (every layer's merged weight is computed and checked
    before any is written), unmerging with nothing merged is an error, and adapters are validated against the
    shapes of the layers they target before anything is injected.

    Args:
        model (`transformers.PreTrainedModel`): a `CLIPModel`, `VisionTextDualEncoderModel` or compatible model.
        config (`ProjectionEditConfig`): the adapter configuration.
        adapter_name (`str`, defaults to `"default"`): the adapter name.

    Example:
        ```py
        >>> import hf_clip_forget
        >>> model = clip.add_forget_adapter(["cat"], tokenizer=tokenizer)  # a ForgetPeftModel
        >>> model.base_model  # this tuner
        ```

    **Attributes**:
        - **model** -- the wrapped model.
        - **peft_config** -- adapter name → `ProjectionEditConfig`.
    """

    prefix: str = PREFIX
    tuner_layer_cls = ProjectionEditLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, preceded by building the edit when the config is a request (it names classes but has
        no factors yet): ``get_peft_model``, ``PeftModel.add_adapter``, ``inject_adapter_in_model`` and
        transformers' ``model.add_adapter(config)`` all arrive here."""
        check_adapter_name(adapter_name)  # every adapter name enters here: add_adapter, from_pretrained, load_adapter
        self._check_name_is_new(adapter_name)
        config = self.peft_config[adapter_name]
        built = None
        if not is_built(config):
            if not can_build(config):
                raise ValueError(
                    "This ProjectionEditConfig describes no edit: it names no `forgotten_classes` and holds no "
                    "factors, so the adapter would change nothing. Build forget adapters with "
                    "`hf_clip_forget.add_forget_adapter(model, ['dog'], tokenizer=...)`, or name the classes in the "
                    "config (`ProjectionEditConfig(forgotten_classes=['dog'])`; the tokenizer is then loaded from the "
                    "model's checkpoint)."
                )
            family_of(model)  # an unsupported model is refused before its tokenizer is looked for
            built = build_adapter(model, config, BuildInputs(tokenizer=_config_tokenizer(model, config)))
            self.peft_config[adapter_name] = config = built.config
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if built is not None:
            self.set_factors(adapter_name, built.factors)

    def _check_new_adapter_config(self, config: ProjectionEditConfig) -> None:
        # runs before anything is injected: refuse adapters built for another base here, not midway
        family = family_of(self.model)
        if not config.inference_mode:
            raise ValueError(
                "Forget adapters are closed-form edits with nothing to train; load them with is_trainable=False "
                "(the default)."
            )
        self._check_targets(config, family)
        self._check_not_a_partial_stack(config)
        for suffix, shape in config.projection_shapes.items():
            base = self._projection(suffix)
            actual = [getattr(base, "out_features", None), getattr(base, "in_features", None)]
            if actual != list(shape):
                raise ValueError(
                    f"This adapter was saved for a `{suffix}` of shape (out, in) = {tuple(shape)}, but the model's "
                    f"`{suffix}` is {tuple(actual)}. Load it onto the base model it was built for."
                )
        for pattern in (config.rank_pattern, config.retain_rank_pattern):
            for suffix, rank in pattern.items():
                out_features = self._output_dim(suffix)
                if rank > out_features:
                    raise ValueError(
                        f"The adapter asks for {rank} factor columns on `{suffix}`, which has only {out_features} "
                        "output features. The adapter config is corrupt or altered; nothing was allocated."
                    )
        if (
            is_built(config)
            and config.verify_base_fingerprint
            and (config.base_fingerprints or not config.trust_unverified)
        ):
            self._check_base_fingerprints(config)

    def _check_targets(self, config: ProjectionEditConfig, family) -> None:
        """A forget adapter edits the family's embedding layers and nothing else (peft would wrap any module a
        config names, an attention layer included)."""
        allowed = set(family.projections.values())
        targets = config.target_modules
        named = sorted(targets) if targets is not None else []
        built_for = set(config.rank_pattern) | set(config.projection_shapes)
        others = sorted((set(named) | built_for) - allowed)
        if others:
            raise ValueError(
                f"This forget adapter targets {others}, which are not the embedding layers of this {family.name} "
                f"model ({sorted(allowed)}): a forget edit is defined on the layers that produce the joint "
                "embeddings only. The adapter config is corrupt or was altered; nothing was injected."
            )
        if is_built(config) and set(named) != set(config.rank_pattern):
            raise ValueError(
                f"This adapter's `target_modules` {named} differ from the layers its factors are for "
                f"{sorted(config.rank_pattern)}; the adapter config is corrupt or was altered."
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The one gate of every state-dict load (peft's ``set_peft_model_state_dict``, which ``from_pretrained``
        and ``load_adapter`` use): the state dict must be exactly this adapter's checked factors
        (:func:`~.integrity.check_incoming_state`). When it is refused and the adapter was created for this load,
        it is taken out again, so the caller's base model is as it was."""
        fresh = adapter_is_unset(model, adapter_name)
        try:
            check_incoming_state(config, adapter_name, state_dict, factors_of_model(model, adapter_name))
        except ValueError:
            if fresh:
                discard_adapter(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # peft's mixed-adapter batches (`adapter_names=`): a forgotten class must stay forgotten for every input
        refuse_mixed_batch(kwargs.get("adapter_names"))
        yield

    def _check_not_a_partial_stack(self, config: ProjectionEditConfig) -> None:
        if len(config.stack) > 1 and not _LOADING_WHOLE_STACK.get():
            raise ValueError(
                f"This adapter was saved as the first of a stack of {len(config.stack)} forget adapters "
                f"{list(config.stack)}; loading it alone would forget less than the stack's card says. Load the "
                "whole stack with `hf_clip_forget.ForgetPeftModel.from_pretrained(base_model, path_or_repo)` "
                "(or one member on purpose with `subfolder=<name>`)."
            )

    def _check_name_is_new(self, adapter_name: str) -> None:
        if any(adapter_name in layer.projection_edit_settings for layer in self.forget_layers().values()):
            raise ValueError(
                f"The model already holds a forget adapter named {adapter_name!r}; adding another under that name "
                "would replace it. Choose another `adapter_name`, or `delete_adapter` the old one first (to stack "
                "onto the adapters of a model, call `add_forget_adapter` on the PeftModel that holds them)."
            )

    def _check_base_fingerprints(self, config: ProjectionEditConfig) -> None:
        """The base must be the one the adapter was built on: its projection weights and every tower (see
        :func:`~.build.base_fingerprints`). A record that lacks entries this library writes is refused unless
        ``trust_unverified``."""
        mismatching, missing = fingerprint_mismatches(self.model, config.base_fingerprints)
        if mismatching:
            raise ValueError(
                f"Base model fingerprint mismatch for {mismatching}: the adapter was built on a base whose weights "
                "differ from this model's there. A forget edit computed for one model removes the wrong directions "
                "from another. Load the base model the adapter was built for, or, to apply it to this base "
                "deliberately, pass `verify_base_fingerprint=False` to `from_pretrained` / `load_adapter`."
            )
        if missing and not config.trust_unverified:
            raise ValueError(
                f"The adapter's `base_fingerprints` lack {missing}, which hf_clip_forget records for this model: the "
                "base it was built on cannot be fully checked. The config is from an older version or was altered; "
                "rebuild it, or load it with `trust_unverified=True` if you trust its source."
            )

    def _projection(self, suffix: str) -> nn.Module:
        """The (unwrapped) layer named ``suffix``; a clear error when the model has none."""
        for name, module in self.model.named_modules():
            if name == suffix or name.endswith("." + suffix):
                return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        raise ValueError(
            f"This adapter edits `{suffix}`, which the model does not have. It was built for a dual encoder with that "
            "projection layer (CLIPModel, VisionTextDualEncoderModel)."
        )

    def _output_dim(self, suffix: str) -> int:
        """The dimension of the embedding layer ``suffix`` produces (for a module that is not a Linear layer,
        the dimension of the joint embedding: the text side's)."""
        layer = self._projection(suffix)
        if isinstance(layer, nn.Linear):
            return layer.out_features
        return self._projection(family_of(self.model).text.module).out_features

    def unedited_weight(self, suffix: str) -> torch.Tensor:
        """The weight of projection ``suffix`` as it is without any forget edit (merged or not)."""
        for name, module in self.model.named_modules():
            if isinstance(module, ProjectionEditLayer) and (name == suffix or name.endswith("." + suffix)):
                return module.unedited_weight()
        return self._projection(suffix).weight

    def _create_and_replace(
        self, config: ProjectionEditConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        settings = EditSettings(
            method=config.method,
            alpha=float(config.alpha),
            ccup_lambda=float(config.ccup_lambda),
            ccup_mu=float(config.ccup_mu),
            rank_tolerance=float(config.rank_tolerance),
        )
        forget_rank = _pattern_value(config.rank_pattern, current_key)
        retain_rank = _pattern_value(config.retain_rank_pattern, current_key)
        if isinstance(target, ProjectionEditLayer):
            target.update_layer(adapter_name, settings, forget_rank, retain_rank, inference_mode=True)
            return
        family = family_of(self.model)
        image_side = not family.is_text_side(current_key)
        new_module = self._create_new_module(
            adapter_name, target, settings, forget_rank, retain_rank, image_side, self._output_dim(current_key),
            family.side_of_module(current_key).channel_dim,
        )  # fmt: skip
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        adapter_name, target, settings, forget_rank, retain_rank, image_side=True, embedding_dim=None, channel_dim=-1
    ) -> Linear | OutputEdit:
        """A :class:`Linear` forget layer around an ``nn.Linear`` (mergeable), else an :class:`OutputEdit` on the
        module's output along its axis ``channel_dim`` (the family layer declares which modules these are)."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = Linear if isinstance(base, nn.Linear) else OutputEdit
        return layer_cls(
            target, adapter_name, settings, forget_rank, retain_rank, inference_mode=True, image_side=image_side,
            embedding_dim=embedding_dim, channel_dim=channel_dim,
        )  # fmt: skip

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft re-points `weight`/`bias` of the module put back on unload; a module edited on its output (not a
        # Linear layer) is simply put back as it was
        if isinstance(child, OutputEdit) and not isinstance(new_module, BaseTunerLayer):
            setattr(parent, child_name, new_module)
            return
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        if next(base.parameters(), None) is None:
            # peft places the new layer on the device of the child's first parameter; a module without any (ALIGN's
            # average pooling) is placed with its parent instead
            setattr(parent, child_name, new_module)
            anchor = next(parent.parameters(), None)
            if anchor is not None and anchor.device.type != "meta":
                new_module.to(anchor.device)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False

    # ----------------------------------------------------------------------------------------------------- factors
    def forget_layers(self) -> dict[str, ProjectionEditLayer]:
        """Module name → forget layer, for every wrapped projection."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, ProjectionEditLayer)}

    def set_factors(self, adapter_name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Store an adapter's factors: ``{module-name suffix: (forget, retain or None)}``."""
        layers = self.forget_layers()
        for suffix, (forget, retain) in factors.items():
            matching = [layer for name, layer in layers.items() if name == suffix or name.endswith("." + suffix)]
            if not matching:
                raise KeyError(f"No forget layer named {suffix!r}; wrapped layers: {sorted(layers)}.")
            for layer in matching:
                layer.set_factors(adapter_name, forget, retain)
        if adapter_name in self.peft_config:
            # the config records what its factors are: the load gate and a later save check against it
            self.peft_config[adapter_name].factor_checksums = factor_checksums(self.forget_layers(), adapter_name)

    @contextlib.contextmanager
    def edits_bypassed(self):
        """Within this context the wrapped layers compute their unedited outputs (merged or not)."""
        with contextlib.ExitStack() as stack:
            for layer in self.forget_layers().values():
                stack.enter_context(layer.edits_bypassed())
            yield

    # ------------------------------------------------------------------------------------------------------- merge
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the union of the given (default: active) adapters into the projection weights, atomically."""
        self._check_merge_allowed()
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        unknown = sorted(set(adapter_names or []) - set(self.peft_config))
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        plan = []
        for layer in self.forget_layers().values():
            requested = layer.active_adapters if adapter_names is None else adapter_names
            names = [n for n in requested if n in layer.projection_edit_settings and n not in layer.merged_adapters]
            if names:
                plan.append((layer, layer.merged_weight(names), names))  # raises before anything is written
        if not plan:
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        for layer, weight, names in plan:
            layer.write_merged_weight(weight, names)

    def unmerge_adapter(self) -> None:
        """Restore the projection weights from before the first merge, bit for bit."""
        layers = [layer for layer in self.forget_layers().values() if layer.merged]
        if not layers:
            raise ValueError(
                "No forget adapter is merged, so there is nothing to unmerge. Call `merge_adapter()` first."
            )
        for layer in layers:
            layer.unmerge()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            merged = [layer for layer in self.forget_layers().values() if layer.merged]
            for layer in merged:
                layer.merged_weight([])  # raises peft's NaN error before anything is written
            for layer in merged:
                layer._check_merged_weight()  # merged anew from current factors, as the forward does
            # merge atomically first, so a failure leaves the wrapped model exactly as it was
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        else:
            # `unload()` promises the original base model: put back the weights from before any merge
            for layer in self.forget_layers().values():
                if layer.merged:
                    layer.unmerge()
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def _config_tokenizer(model: nn.Module, config: ProjectionEditConfig):
    """The tokenizer a config is built with through peft's entry points, which take no tokenizer argument: the one
    the config names, else the one saved with the model's checkpoint."""
    from transformers import AutoTokenizer

    source = config.tokenizer_name_or_path or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError(
            "This config is built through peft (get_peft_model, add_adapter, inject_adapter_in_model or "
            "transformers' add_adapter), which takes no tokenizer, and the model was not loaded from a checkpoint "
            "whose tokenizer could be used. Name one in the config (`ProjectionEditConfig(..., "
            "tokenizer_name_or_path=<model id or directory>)`), or call `hf_clip_forget.add_forget_adapter(model, "
            "classes, tokenizer=tokenizer)`."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - every failure means the same to the user
        raise ValueError(
            f"Could not load the tokenizer of {source!r} to build this config ({error}). Set "
            "`tokenizer_name_or_path` in the config, or call `hf_clip_forget.add_forget_adapter(model, classes, "
            "tokenizer=tokenizer)`."
        ) from error


def _pattern_value(pattern: dict, key: str) -> int:
    """The entry of ``pattern`` whose key is ``key`` or a dotted suffix of it (0 when absent)."""
    for name, value in pattern.items():
        if key == name or key.endswith("." + name):
            return int(value)
    return 0
