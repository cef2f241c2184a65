"""What a saved forget adapter directory (or Hub repo) holds, read before anything is loaded, and the integrity
checks of loaded factors."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import Tensor

from ..core.subspace import EditSpec
from ..files import ADAPTER_CONFIG_NAME
from ..tuners.projection_edit import PEFT_TYPE, SAVED_PEFT_TYPE, ProjectionEditLayer


FORGET_PEFT_TYPES = (SAVED_PEFT_TYPE, PEFT_TYPE.value)


def saved_adapters(model_id: str, root_name: str, **hub_kwargs) -> list[tuple[str, str | None]]:
    """``(adapter name, subfolder)`` of every adapter saved under ``model_id`` (root first), as
    ``save_pretrained`` writes them: one at the root (named ``root_name``), one per direct subfolder.

    Raises a ``ValueError`` when one of them is an adapter of another peft method (loading it would give a model
    that forgets nothing), or when the root records a stack of which members are missing.
    """
    configs = _read_configs(model_id, **hub_kwargs)
    for subfolder, config in configs.items():
        check_forget_peft_type(config, model_id if subfolder is None else f"{model_id}/{subfolder}")
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
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); the adapter is corrupt.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; the adapter is corrupt.")
    return data


# ------------------------------------------------------------------------------------------------- integrity
def factor_checksums(layers: dict[str, ProjectionEditLayer], adapter_name: str) -> dict[str, str]:
    """sha256 of every stored factor of ``adapter_name``: ``{"<module>.forget": hex, "<module>.retain": hex}``."""
    checksums = {}
    for module, layer in layers.items():
        for role, store in (("forget", layer.projection_edit_forget), ("retain", layer.projection_edit_retain)):
            if adapter_name in store:
                checksums[f"{module}.{role}"] = tensor_sha256(store[adapter_name])
    return checksums


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's float32 bytes (row-major)."""
    return hashlib.sha256(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def check_loaded_factors(layers: dict[str, ProjectionEditLayer], adapter_name: str, recorded: dict[str, str]) -> None:
    """Refuse loaded factors that are non-finite, were never loaded (all zero), or differ from the checksums
    recorded when the adapter was saved. Every message names the adapter."""
    for layer in layers.values():
        if adapter_name in layer.projection_edit_settings:
            EditSpec(
                name=adapter_name,
                method=layer.projection_edit_settings[adapter_name].method,
                forget=layer.projection_edit_forget[adapter_name],
                retain=layer.projection_edit_retain[adapter_name]
                if adapter_name in layer.projection_edit_retain
                else None,
            )  # validates: finite, every column set
    if not recorded:
        return
    actual = factor_checksums(layers, adapter_name)
    altered = sorted(key for key in set(recorded) | set(actual) if recorded.get(key) != actual.get(key))
    if altered:
        raise ValueError(
            f"The factors of adapter {adapter_name!r} do not match the checksums recorded when it was saved "
            f"({altered}): the weights file is corrupt or was altered after saving, so the edit may not be what its "
            "config and card say. Re-download or rebuild it; `hf-clip-forget verify` recomputes the edit from its "
            "recorded classes."
        )
