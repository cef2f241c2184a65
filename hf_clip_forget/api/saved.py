"""What a saved forget adapter directory (or Hub repo) holds, read before anything is loaded, and the integrity
checks of loaded factors."""

from __future__ import annotations

import os

from ..files import ADAPTER_CONFIG_NAME
from ..tuners.projection_edit import PEFT_TYPE, SAVED_PEFT_TYPE, ProjectionEditLayer
from ..tuners.projection_edit.integrity import (  # noqa: F401 - re-exported for the API layer
    FACTOR_ATTRIBUTES,
    ExpectedFactor,
    check_incoming_state,
    factor_checksums,
    settle_interrupted_save,
    tensor_sha256,
)
from ..tuners.projection_edit.schema import check_config_values, read_config_json


FORGET_PEFT_TYPES = (SAVED_PEFT_TYPE, PEFT_TYPE.value)


def saved_adapters(model_id: str, root_name: str, **hub_kwargs) -> list[tuple[str, str | None]]:
    """``(adapter name, subfolder)`` of every adapter saved under ``model_id`` (root first), as
    ``save_pretrained`` writes them: one at the root (named ``root_name``), one per direct subfolder.

    Raises a ``ValueError`` when one of them is an adapter of another peft method (loading it would give a model
    that forgets nothing), or when the root records a stack of which members are missing.
    """
    if os.path.isdir(model_id):
        settle_interrupted_save(model_id)  # a killed save is finished or undone before anything is read
    configs = _read_configs(model_id, **hub_kwargs)
    for subfolder, config in configs.items():
        check_forget_peft_type(config, model_id if subfolder is None else f"{model_id}/{subfolder}")
        check_config_values(config)
    stack = (configs.get(None) or {}).get("stack") or []
    missing = [name for name in stack[1:] if name not in configs]
    if missing:
        raise ValueError(
            f"{model_id} was saved as a stack of forget adapters {stack}, but {missing} are missing from it; loading "
            "the rest would forget less than its card says. Save or upload the whole stack again."
        )
    subfolders = sorted(name for name in configs if name is not None)
    return ([(root_name, None)] if None in configs else []) + [(name, name) for name in subfolders]


def check_forget_peft_type(config: dict, where: str) -> None:
    """Refuse an adapter config of another peft method, naming it."""
    peft_type = config.get("peft_type")
    if peft_type not in FORGET_PEFT_TYPES:
        raise ValueError(
            f"{where} holds a {peft_type!r} adapter, not a forget adapter (peft_type 'PROJECTION_EDIT'). Load it with "
            "`peft.PeftModel.from_pretrained`; `ForgetPeftModel` loads only hf_clip_forget adapters."
        )


def read_adapter_config(model_id: str, subfolder: str | None = None, **hub_kwargs) -> dict | None:
    """The JSON of one saved adapter config, or ``None`` when there is none there."""
    path = ADAPTER_CONFIG_NAME if not subfolder else f"{subfolder}/{ADAPTER_CONFIG_NAME}"
    if os.path.isdir(model_id):
        full = os.path.join(model_id, path)
        return _load_json(full) if os.path.isfile(full) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _load_json(hf_hub_download(model_id, path, **hub_kwargs))
    except EntryNotFoundError:
        return None


def _read_configs(model_id: str, **hub_kwargs) -> dict[str | None, dict]:
    """Subfolder (``None`` for the root) → adapter config JSON, for the root and direct subfolders."""
    root = read_adapter_config(model_id, None, **hub_kwargs)
    paths = _config_paths(model_id, **hub_kwargs)
    if paths is None:  # the Hub could not list the repo (e.g. offline): the root names the members of its stack
        paths = [f"{name}/{ADAPTER_CONFIG_NAME}" for name in ((root or {}).get("stack") or [])[1:]]
    configs = {None: root} if root is not None else {}
    for path in paths:
        subfolder = os.path.dirname(path)
        if subfolder and "/" not in subfolder and os.path.basename(path) == ADAPTER_CONFIG_NAME:
            config = read_adapter_config(model_id, subfolder, **hub_kwargs)
            if config is not None:
                configs[subfolder] = config
    return configs


def _config_paths(model_id: str, **hub_kwargs) -> list[str] | None:
    if os.path.isdir(model_id):
        return [
            os.path.relpath(os.path.join(directory, ADAPTER_CONFIG_NAME), model_id).replace(os.sep, "/")
            for directory, _, files in os.walk(model_id)
            if ADAPTER_CONFIG_NAME in files
        ]
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(model_id, **{k: v for k, v in hub_kwargs.items() if k != "cache_dir"})
    except Exception:  # noqa: BLE001 - offline or unreachable: fall back to what the root config says
        return None
    return [f for f in files if f.endswith(ADAPTER_CONFIG_NAME)]


def _load_json(path: str) -> dict:
    """The config's JSON, read strictly (:func:`~hf_clip_forget.tuners.projection_edit.schema.read_config_json`)."""
    return read_config_json(path)


# ------------------------------------------------------------------------------------------------- integrity
def check_loaded_factors(layers: dict[str, ProjectionEditLayer], adapter_name: str, config) -> None:
    """After a load, check the factors the layers now hold for ``adapter_name`` as the load gate checks incoming
    ones (:func:`~hf_clip_forget.tuners.projection_edit.integrity.check_incoming_state`): defence in depth for a
    loader that copied them some other way. Every message names the adapter."""
    expected, state = [], {}
    for module, layer in layers.items():
        for role, store in (("forget", layer.projection_edit_forget), ("retain", layer.projection_edit_retain)):
            if adapter_name in store:
                factor = store[adapter_name]
                expected.append(ExpectedFactor(module, role, int(factor.shape[0]), int(factor.shape[1])))
                state[f"{module}.{FACTOR_ATTRIBUTES[role]}"] = factor
    check_incoming_state(config, adapter_name, state, expected)
