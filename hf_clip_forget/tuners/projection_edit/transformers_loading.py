"""transformers' ``model.load_adapter(path)`` for forget adapters: through the same gate as peft's loaders.

transformers 5 loads an adapter's weights with its own checkpoint loader, not with peft's
``set_peft_model_state_dict``, so the tuner's load gate (``_remap_adapter_state_dict_for_load``) never sees them, and a
tampered file could write base-model weights. :func:`guard_transformers_load_adapter` wraps
``PeftAdapterMixin.load_adapter`` once: for a forget adapter it checks the saved config and weights file
(:meth:`ProjectionEditConfig.from_pretrained`) or the given state dict before anything is injected, checks the
loaded factors afterwards, and on any failure puts the model back as it was. Other peft methods pass through
untouched.
"""

from __future__ import annotations

import functools
import inspect
import os

from .config import ProjectionEditConfig
from .integrity import check_incoming_state, factor_checksums, factors_of_config, restored_on_failure
from .layer import ProjectionEditLayer
from .registration import PEFT_TYPE, SAVED_PEFT_TYPE
from .schema import read_config_json


_GUARD_MARK = "_hf_clip_forget_guarded"


def guard_transformers_load_adapter() -> None:
    """Wrap ``transformers.integrations.peft.PeftAdapterMixin.load_adapter`` (idempotent)."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, _GUARD_MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        config = _forget_config(arguments)
        if config is None:
            return original(*bound.args, **bound.kwargs)
        name = arguments.get("adapter_name") or "default"
        with restored_on_failure(self):
            state = arguments.get("adapter_state_dict")
            if state is not None:
                check_incoming_state(config, name, state, factors_of_config(config), exact=False)
            result = original(*bound.args, **bound.kwargs)
            _check_loaded(self, config, name)
        return result

    setattr(load_adapter, _GUARD_MARK, True)
    PeftAdapterMixin.load_adapter = load_adapter


def _forget_config(arguments: dict) -> ProjectionEditConfig | None:
    """The checked config of the forget adapter being loaded, or ``None`` for another peft method."""
    given = arguments.get("peft_config")
    if given is not None:
        return given if isinstance(given, ProjectionEditConfig) else None
    source = arguments.get("peft_model_id")
    if source is None:
        return None
    hub_kwargs = dict(arguments.get("adapter_kwargs") or {})
    subfolder = hub_kwargs.pop("subfolder", None)
    local = os.path.join(os.fspath(source), subfolder or "", "adapter_config.json")
    if os.path.isfile(local):
        peft_type = read_config_json(local).get("peft_type")
        if peft_type not in (SAVED_PEFT_TYPE, PEFT_TYPE.value):
            return None
    elif not _is_forget_adapter_on_hub(os.fspath(source), subfolder, hub_kwargs):
        return None
    return ProjectionEditConfig.from_pretrained(os.fspath(source), subfolder=subfolder, **hub_kwargs)


def _is_forget_adapter_on_hub(source: str, subfolder, hub_kwargs: dict) -> bool:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "adapter_config.json", subfolder=subfolder, **hub_kwargs)
    except Exception:  # noqa: BLE001 - not an adapter we can read: transformers reports it as it would
        return False
    return read_config_json(path).get("peft_type") in (SAVED_PEFT_TYPE, PEFT_TYPE.value)


def _check_loaded(model, config: ProjectionEditConfig, name: str) -> None:
    """The factors transformers copied must be the ones the config records."""
    layers = {
        module_name: module
        for module_name, module in model.named_modules()
        if isinstance(module, ProjectionEditLayer) and name in module.projection_edit_settings
    }
    actual = factor_checksums(layers, name)
    injected = getattr(model, "peft_config", {}).get(name)
    # transformers reads the config again itself: it must be the one checked, and the factors its checksums
    if injected is None or injected.to_dict() != config.to_dict() or actual != config.factor_checksums:
        raise ValueError(
            f"The forget adapter {name!r} transformers loaded is not the one checked before loading (its config or "
            "its factors differ): the files changed while they were loaded. Refused; the model is as it was."
        )


__all__ = ["guard_transformers_load_adapter"]
