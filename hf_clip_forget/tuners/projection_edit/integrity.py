"""The gate every incoming forget adapter passes, on every load path, before anything is copied.

A shared adapter is untrusted input. It may carry nothing but its edit: the float32 factors its config declares,
equal to the sha256 checksums its config records, finite, every column set. Every loader reaches these checks:

* ``ProjectionEditConfig.from_pretrained`` (peft's ``PeftModel.from_pretrained`` and ``load_adapter``, and
  ``ForgetPeftModel``) checks the saved config (:func:`check_saved_config`) and the weights file
  (:func:`check_weights_file`) before peft injects anything;
* the tuner's ``_remap_adapter_state_dict_for_load``, which peft's ``set_peft_model_state_dict`` calls on every
  state-dict load, checks the state dict against the model's forget layers (:func:`check_incoming_state`) and, when
  the load fails, takes out the layers injected for it (:func:`discard_adapter`);
* transformers' ``model.load_adapter`` is guarded the same way (:mod:`.transformers_loading`).

A config that lacks its checksums or its base fingerprints is refused unless the caller opts in with
``trust_unverified=True``: deleting a check must never switch it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.subspace import EditSpec
from .layer import ProjectionEditLayer


#: Where a factor lives on a forget layer, by role.
FACTOR_ATTRIBUTES = {"forget": "projection_edit_forget", "retain": "projection_edit_retain"}
#: peft's prefix of checkpoint keys saved from a PeftModel.
CHECKPOINT_PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class ExpectedFactor:
    """One factor an adapter must carry: on layer ``module``, ``role`` ``"forget"`` or ``"retain"``, of shape
    ``(rows, columns)`` (``rows`` is ``None`` when the config alone does not say it)."""

    module: str
    role: str
    rows: int | None
    columns: int

    @property
    def checksum_key(self) -> str:
        return f"{self.module}.{self.role}"

    def names_key(self, key: str, exact: bool) -> bool:
        """Whether checkpoint ``key`` is this factor's (``exact``: the module path must be the whole path)."""
        key = key.removeprefix(CHECKPOINT_PREFIX)
        suffix = f"{self.module}.{FACTOR_ATTRIBUTES[self.role]}"
        return key == suffix or (not exact and key.endswith("." + suffix))


# --------------------------------------------------------------------------------------------------- checksums
def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's float32 bytes (row-major)."""
    return hashlib.sha256(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def factor_checksums(layers: dict[str, ProjectionEditLayer], adapter_name: str) -> dict[str, str]:
    """sha256 of every stored factor of ``adapter_name``: ``{"<module>.forget": hex, "<module>.retain": hex}``."""
    checksums = {}
    for module, layer in layers.items():
        for role, attribute in FACTOR_ATTRIBUTES.items():
            store = getattr(layer, attribute)
            if adapter_name in store:
                checksums[f"{module}.{role}"] = tensor_sha256(store[adapter_name])
    return checksums


# ------------------------------------------------------------------------------------------- what is expected
def factors_of_config(config) -> list[ExpectedFactor]:
    """The factors a saved config declares (``rank_pattern``, ``retain_rank_pattern``, ``projection_shapes``)."""
    expected = []
    for role, pattern in (("forget", config.rank_pattern), ("retain", config.retain_rank_pattern)):
        for module, columns in pattern.items():
            rows = config.projection_shapes.get(module, [None])[0]
            expected.append(ExpectedFactor(module, role, rows, int(columns)))
    return expected


def factors_of_model(model: nn.Module, adapter_name: str) -> list[ExpectedFactor]:
    """The factors the forget layers of ``model`` hold for ``adapter_name`` (module names without peft's
    ``base_model.model.`` prefix)."""
    expected = []
    for name, layer in model.named_modules():
        if not isinstance(layer, ProjectionEditLayer) or adapter_name not in layer.projection_edit_settings:
            continue
        module = name.removeprefix(CHECKPOINT_PREFIX)
        for role, attribute in FACTOR_ATTRIBUTES.items():
            store = getattr(layer, attribute)
            if adapter_name in store:
                rows, columns = store[adapter_name].shape
                expected.append(ExpectedFactor(module, role, int(rows), int(columns)))
    return expected


# ---------------------------------------------------------------------------------------------------- checks
def check_saved_config(config, where: str) -> None:
    """A loaded config must carry its checks and describe an edit (unless ``config.trust_unverified``).

    Refused: a config describing no factors; checksums that do not cover exactly its factors; no base
    fingerprints (while the fingerprint check is on); an edit that is the identity (``alpha = 0``, CCUP ``λ = 0``).
    """
    expected = factors_of_config(config)
    if not expected:
        raise ValueError(f"{where}: the adapter config declares no factors (`rank_pattern` is empty); it is corrupt.")
    if config.embedding_source == "class_names" and not config.forgotten_classes:
        raise ValueError(
            f"{where}: the adapter config names no `forgotten_classes`, so nothing says what its factors forget. "
            "The config is corrupt or was altered; refused."
        )
    if config.method == "nullspace" and config.alpha == 0 or config.method == "ccup" and config.ccup_lambda == 0:
        strength = "alpha = 0" if config.method == "nullspace" else "ccup_lambda = 0"
        raise ValueError(
            f"{where}: the adapter's edit is the identity ({strength}), so it forgets nothing while its config says "
            f"it forgets {list(config.forgotten_classes)}. The config was altered; refused."
        )
    if config.trust_unverified:
        return
    recorded = set(config.factor_checksums)
    declared = {factor.checksum_key for factor in expected}
    if recorded != declared:
        raise ValueError(
            f"{where}: the adapter config records checksums for {sorted(recorded)} but declares the factors "
            f"{sorted(declared)}. An adapter saved by hf_clip_forget records a sha256 of every factor; without them "
            "its factors cannot be checked. Re-download it, or, if you trust its source, load it with "
            "`trust_unverified=True` (its card and `verify` then say 'unverified')."
        )
    if config.verify_base_fingerprint and not config.base_fingerprints:
        raise ValueError(
            f"{where}: the adapter config records no `base_fingerprints`, so the base model it was built for cannot "
            "be checked. An adapter saved by hf_clip_forget always records them. Re-download it, or load it with "
            "`trust_unverified=True` if you trust its source (or `verify_base_fingerprint=False` to apply it to "
            "another base deliberately)."
        )


def check_incoming_state(
    config, adapter_name: str, state_dict: dict[str, Tensor], expected: list[ExpectedFactor], exact: bool = True
) -> None:
    """Refuse a state dict that is not exactly the adapter's factors, before anything is copied: keys other than
    the expected factors' (a base weight included), a missing factor, another dtype or shape, NaN/inf, an all-zero
    column, or factors that differ from the config's ``factor_checksums`` (required unless
    ``config.trust_unverified``). Every message names the adapter."""
    tensors = _match_keys(adapter_name, state_dict, expected, exact)
    for factor, tensor in tensors.items():
        _check_tensor(adapter_name, factor, tensor)
    by_role = {factor.role: tensor for factor, tensor in tensors.items()}
    EditSpec(name=adapter_name, method=config.method, forget=by_role["forget"], retain=by_role.get("retain"))
    _check_checksums(config, adapter_name, {factor.checksum_key: tensor for factor, tensor in tensors.items()})


def _match_keys(adapter_name, state_dict, expected, exact) -> dict[ExpectedFactor, Tensor]:
    matched, extra = {}, []
    for key, tensor in state_dict.items():
        owners = [factor for factor in expected if factor.names_key(key, exact)]
        if len(owners) != 1 or owners[0] in matched:
            extra.append(key)
        else:
            matched[owners[0]] = tensor
    if extra:
        shown = ", ".join(repr(key) for key in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(
            f"The weights of forget adapter {adapter_name!r} carry tensors outside its edit: {shown}. A forget "
            "adapter holds only its factors; a file that also holds base-model weights could rewrite the model. "
            "Refused before anything was loaded; do not use this file."
        )
    missing = [factor.checksum_key for factor in expected if factor not in matched]
    if missing:
        raise ValueError(
            f"The weights of forget adapter {adapter_name!r} lack the factors {missing}: its edit was never computed "
            "or the file is truncated or altered. Re-download or rebuild it."
        )
    return matched


def _check_tensor(adapter_name: str, factor: ExpectedFactor, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor) or tensor.dtype != torch.float32 or tensor.ndim != 2:
        found = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(
            f"The {factor.checksum_key} factor of forget adapter {adapter_name!r} is {found}"
            f"{'' if not isinstance(tensor, Tensor) else f' of {tensor.ndim} dimensions'}; forget adapters store "
            "2-D float32 factors. The file was re-encoded or altered; refused."
        )
    rows, columns = tensor.shape
    if columns != factor.columns or (factor.rows is not None and rows != factor.rows):
        raise ValueError(
            f"The {factor.checksum_key} factor of forget adapter {adapter_name!r} has shape {tuple(tensor.shape)}, "
            f"but its config declares ({factor.rows if factor.rows is not None else 'd'}, {factor.columns}). The "
            "file or the config was altered; refused."
        )
    if tensor.device.type != "meta" and not torch.isfinite(tensor).all():
        raise ValueError(
            f"The loaded factors of forget adapter {adapter_name!r} contain NaN or inf values: the adapter file is "
            "corrupt. Re-download or rebuild it."
        )


def _check_checksums(config, adapter_name: str, tensors: dict[str, Tensor]) -> None:
    recorded = config.factor_checksums
    if not recorded:
        if config.trust_unverified:
            return
        raise ValueError(
            f"The config of forget adapter {adapter_name!r} records no checksums of its factors, so the factors being "
            "loaded cannot be checked against it. Load a saved adapter with its own saved config (omit `config=`), "
            "or pass `trust_unverified=True` if you trust its source."
        )
    actual = {key: tensor_sha256(tensor) for key, tensor in tensors.items()}
    altered = sorted(key for key in set(recorded) | set(actual) if recorded.get(key) != actual.get(key))
    if altered:
        raise ValueError(
            f"The factors of adapter {adapter_name!r} do not match the checksums recorded in its config ({altered}): "
            f"the weights file is corrupt or was altered, or its config (forgetting "
            f"{list(config.forgotten_classes)}) is not the one saved with these factors (a `config=` passed to "
            "`from_pretrained` must be the saved adapter's own). Refused; re-download or rebuild it. "
            "`hf-clip-forget verify` recomputes an edit from its recorded classes."
        )


# ---------------------------------------------------------------------------------------------- the weights file
def settle_interrupted_save(directory: str) -> None:
    """Before a local adapter directory is read: finish or undo a save that was killed midway in it (only a save
    that could not swap the whole directory at once — into a mount point — leaves one; see
    :func:`hf_clip_forget.files.recover_interrupted_save`), so a load sees the old or the new adapter, complete."""
    from ...files import recover_interrupted_save

    try:
        recover_interrupted_save(directory)
    except OSError as error:
        raise ValueError(
            f"{directory} holds a save that was interrupted, and it could not be completed or undone ({error}). "
            "Make the directory writable and load again (or save the adapter anew)."
        ) from None


def check_weights_file(directory: str, config, where: str, local: bool) -> None:
    """Check the weights file of a saved adapter before anything is injected: not a symbolic link leaving the
    adapter directory (``local`` directories), names and shapes read before any tensor, then the tensors through
    :func:`check_incoming_state`. ``adapter_model.safetensors`` is read as peft reads it; a legacy
    ``adapter_model.bin`` (peft's ``safe_serialization=False``) only with ``torch.load(weights_only=True)``, which
    never runs code from the file."""
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.lexists(path):
        path = os.path.join(directory, PICKLE_NAME)
    if not os.path.lexists(path):
        raise ValueError(f"{where} holds no {SAFETENSORS_NAME}: the adapter's factors are missing.")
    if local and os.path.islink(path):
        target = os.path.realpath(path)
        if not any(os.path.commonpath([target, home]) == home for home in _homes_of(directory)):
            raise ValueError(
                f"{path} is a symbolic link to {target}, outside the adapter directory: the factors would be another "
                "adapter's while this config names what it forgets. Refused; copy the real file in."
            )
    expected = factors_of_config(config)
    try:
        state = _read_safetensors(path, expected, where) if path.endswith(".safetensors") else _read_pickle(path)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - the readers' own errors: header too large, truncated, bad data...
        raise ValueError(
            f"{path} is not a readable weights file ({error}): it is corrupt or truncated. Re-download or rebuild "
            "the adapter."
        ) from None
    check_incoming_state(config, "default", state, expected, exact=False)


def _homes_of(directory: str) -> list[str]:
    """Where an adapter directory's files may live: the directory itself, and for a snapshot of the Hub cache
    (``<repo cache>/snapshots/<revision>/…``, whose files are links into ``<repo cache>/blobs``) that repo's blobs."""
    home = os.path.realpath(directory)
    homes = [home]
    parts = os.path.abspath(directory).split(os.sep)
    if "snapshots" in parts[:-1]:
        repo_cache = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        homes.append(os.path.realpath(os.path.join(repo_cache, "blobs")))
    return homes


def _read_safetensors(path: str, expected: list[ExpectedFactor], where: str) -> dict[str, Tensor]:
    """The tensors of ``path``, reading a tensor only after every name and its shape were found as declared."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        _match_keys("default", dict.fromkeys(keys), expected, exact=False)  # names only, nothing read yet
        for key in keys:
            shape = handle.get_slice(key).get_shape()
            owner = next(factor for factor in expected if factor.names_key(key, exact=False))
            if len(shape) != 2 or shape[1] != owner.columns or (owner.rows and shape[0] != owner.rows):
                raise ValueError(
                    f"{where}: factor {key!r} has shape {tuple(shape)}, but the config declares "
                    f"({owner.rows or 'd'}, {owner.columns}); the file or the config was altered."
                )
        return {key: handle.get_tensor(key) for key in keys}


def _read_pickle(path: str) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict.")
    return state


# ------------------------------------------------------------------------------------------------------ rollback
def adapter_is_unset(model: nn.Module, adapter_name: str) -> bool:
    """Whether every factor of ``adapter_name`` on ``model`` is still as injected (zeros or on the meta device):
    the adapter was created for the load in progress, which may then take it out again."""
    for layer in model.modules():
        if isinstance(layer, ProjectionEditLayer) and adapter_name in layer.projection_edit_settings:
            for attribute in FACTOR_ATTRIBUTES.values():
                store = getattr(layer, attribute)
                factor = store[adapter_name] if adapter_name in store else None
                if factor is not None and factor.device.type != "meta" and bool(factor.any()):
                    return False
    return True


def discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take ``adapter_name`` out of ``model`` (a PeftModel, or a model peft injected layers into): a forget layer
    left with no adapter is replaced by the module it wrapped, so the base model is as it was before the load."""
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, ProjectionEditLayer) or adapter_name not in layer.projection_edit_settings:
            continue
        if set(layer.projection_edit_settings) == {adapter_name}:
            if layer.merged:
                layer.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)
    for holder in {id(m): m for m in (model, getattr(model, "base_model", None), _inner_model(model)) if m}.values():
        configs = holder.__dict__.get("peft_config")
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
            if not configs and holder is _inner_model(model) and not getattr(holder, "_hf_peft_config_loaded", False):
                del holder.__dict__["peft_config"]  # peft's tuner put it on the base model: take it back


@contextlib.contextmanager
def restored_on_failure(model: nn.Module):
    """Within this context, a failure puts every submodule of ``model`` back where it was (undoing any layer a
    loader injected) and its ``peft_config`` and ``_hf_peft_config_loaded`` attributes as they were, then
    propagates."""
    modules = dict(model.named_modules())
    attributes = {
        name: model.__dict__[name] for name in ("peft_config", "_hf_peft_config_loaded") if name in model.__dict__
    }
    configs = dict(attributes["peft_config"]) if isinstance(attributes.get("peft_config"), dict) else None
    try:
        yield
    except BaseException:
        current = dict(model.named_modules())
        for name in sorted(modules, key=lambda n: n.count(".")):  # parents first: a restored parent restores all
            if name and current.get(name) is not modules[name]:
                parent_name, _, child = name.rpartition(".")
                setattr(modules[parent_name], child, modules[name])
                current = dict(model.named_modules())
        for name in ("peft_config", "_hf_peft_config_loaded"):
            if name in attributes:
                model.__dict__[name] = attributes[name]
            else:
                model.__dict__.pop(name, None)
        if configs is not None:
            attributes["peft_config"].clear()
            attributes["peft_config"].update(configs)
        raise


def _inner_model(model: nn.Module):
    tuner = getattr(model, "base_model", None)
    return getattr(tuner, "model", None) if tuner is not None and tuner is not model else None


__all__ = [
    "ExpectedFactor",
    "adapter_is_unset",
    "check_incoming_state",
    "check_saved_config",
    "check_weights_file",
    "discard_adapter",
    "factor_checksums",
    "factors_of_config",
    "factors_of_model",
    "restored_on_failure",
    "settle_interrupted_save",
    "tensor_sha256",
]
