"""The text path of a dual encoder, as the prompt-embedding cache sees it: which tensors an *unedited* text
embedding depends on (for its key), which forget layers edit it, and how their edits reach the embedding.

Forget layers are found by duck typing, not by class: they are defined in the peft glue (``tuners``), which this
layer-1 module must not import (the math core knows nothing of peft). A forget layer is any module with both
``edits_bypassed()`` (a context in which it computes the unedited layer) and ``current_edit()`` (the edit its output
carries now, ``None`` when bypassed, disabled or without an active adapter; merged or not); the text-side one is the
module at the family's text module path in the unwrapped model (peft's ``base_model.model.`` prefix left out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..families import find_family
from .joint_embeddings import embedding_function, embedding_side


#: The prompt embedded once per model to record its text path.
PROBE_PROMPT = "a photo of a dog."
#: Config entries that name where a model came from, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_forget_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a forget layer (duck typing: see the module docstring)."""
    return callable(getattr(module, "edits_bypassed", None)) and callable(getattr(module, "current_edit", None))


def forget_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every forget layer of ``model`` (names relative to the unwrapped model)."""
    return [(name, module) for name, module in base_model(model).named_modules() if is_forget_layer(module)]


def text_side_edits(model: nn.Module) -> list:
    """The edits (``LowRankEdit``, on CPU) that the text-side forget layer of ``model`` applies now; empty when none
    is active. The text embedding of an edited model is these edits applied to the unedited embedding: the layer's
    output is the embedding, up to a normalisation or the choice of a token (:class:`TextPath`), both of which
    commute with a linear edit of the channels up to a positive scale."""
    family = find_family(model)
    layer = _submodule(base_model(model), family.text.module) if family is not None else None
    if layer is None or not is_forget_layer(layer):
        return []
    edit = layer.current_edit(torch.device("cpu"))
    return [] if edit is None else [edit]


@contextlib.contextmanager
def edits_bypassed(model: nn.Module):
    """Within this context every forget layer of ``model`` computes its unedited layer (merge state untouched)."""
    with contextlib.ExitStack() as stack:
        for _, layer in forget_layers(model):
            stack.enter_context(layer.edits_bypassed())
        yield


@dataclass(frozen=True)
class TextPath:
    """What one text forward of a model runs, recorded once per model (:func:`text_path`).

    Attributes:
        roots: the top-level submodules the text forward enters, by name. The key covers each *whole* (every
            parameter and buffer under it), not only the modules whose forward ran: a weight a tower reads without
            calling its module, or a submodule run through ``.forward``, is then still covered; and the model's
            own direct parameters (a bare projection matrix, ``logit_scale``) are added. Covering too much only
            costs a needless recomputation; missing a tensor would serve stale embeddings.
        modules: the root modules themselves (weak references), to notice one being replaced (a layer wrapped).
        after_layer: what follows the text-side layer in the embedding function: ``"identity"`` (the embedding
            is the layer's output, or one token of it), ``"normalize"`` (it is L2-normalised, as CLAP's) or ``None``
            (neither, or no text-side layer known): then an edit cannot be applied to a cached embedding.
    """

    roots: tuple[str, ...]
    modules: tuple[weakref.ref, ...]
    after_layer: str | None

    def still_describes(self, model: nn.Module) -> bool:
        children = dict(base_model(model).named_children())
        return all(
            ref() is not None and children.get(name) is ref()
            for name, ref in zip(self.roots, self.modules, strict=True)
        )


_PATHS: weakref.WeakKeyDictionary[nn.Module, TextPath] = weakref.WeakKeyDictionary()


def text_path(model: nn.Module, tokenize) -> TextPath:
    """The :class:`TextPath` of ``model``: recorded by one forward of :data:`PROBE_PROMPT` (tokenised by
    ``tokenize(list_of_prompts)``) with every forget edit bypassed, then kept until a top-level module is replaced."""
    base = base_model(model)
    known = _PATHS.get(base)
    if known is not None and known.still_describes(base):
        return known
    called: list[str] = []
    layer_outputs: list[Tensor] = []
    family = find_family(base)
    layer = _submodule(base, family.text.module) if family is not None else None
    handles = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in base.named_modules()
        if name
    ]
    if layer is not None:
        handles.append(layer.register_forward_hook(lambda _m, _i, output: layer_outputs.append(output)))
    try:
        with edits_bypassed(base), torch.no_grad():
            embedding = embedding_function(base, "text")(**tokenize([PROBE_PROMPT]))
    finally:
        for handle in handles:
            handle.remove()
    roots = tuple(dict.fromkeys(name.split(".")[0] for name in called))
    children = dict(base.named_children())
    after = _after_layer(embedding, layer_outputs[-1], embedding_side(base, "text").token) if layer_outputs else None
    path = TextPath(roots, tuple(weakref.ref(children[name]) for name in roots), after)
    _PATHS[base] = path
    return path


def _after_layer(embedding: Tensor, output: Tensor, token: int | None) -> str | None:
    """Compare the embedding with the text-side layer's output for the same prompt (the same computation, so the
    match is exact up to rounding in any dtype)."""
    if not isinstance(output, Tensor):
        return None
    if token is not None and output.ndim == 3:
        output = output[:, token]
    embedding, output = embedding.detach().float(), output.detach().float()
    if embedding.shape != output.shape:
        return None
    if torch.allclose(embedding, output, rtol=1e-4, atol=1e-6 * output.abs().max().item()):
        return "identity"
    if torch.allclose(embedding, nn.functional.normalize(output, dim=-1), rtol=1e-4, atol=1e-6):
        return "normalize"
    return None


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def text_path_in_training(model: nn.Module, path: TextPath) -> bool:
    """Whether a module under the roots of ``path`` is in training mode (dropout, batch statistics: then every
    forward differs). Forget layers are left out: peft creates them in training mode, and they compute the same
    either way."""
    base = base_model(model)
    return any(_in_training(base.get_submodule(root)) for root in path.roots)


def _in_training(module: nn.Module) -> bool:
    if is_forget_layer(module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
        return _in_training(base)
    return module.training or any(_in_training(child) for child in module.children())


# ---------------------------------------------------------------------------------------------- the fingerprint
def text_path_tensors(model: nn.Module, path: TextPath) -> dict[str, Tensor]:
    """The parameters and buffers an unedited text embedding of ``model`` depends on, by name: every tensor under
    ``path.roots`` and the model's direct ones, a forget layer's *unedited* weight and bias in place of its own
    tensors (never its factors), under the plain layer's names, so that a model with or without adapters, merged
    or not, has the same tensors."""
    base = base_model(model)
    tensors = {name: value for name, value in _direct_tensors(base)}
    for root in path.roots:
        _collect(base.get_submodule(root), root + ".", tensors)
    return tensors


def unedited_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer under ``module`` by name, a forget layer's *unedited* weight and bias in place of
    its own tensors (never its factors), under the plain layer's names (as :func:`text_path_tensors`)."""
    tensors: dict[str, Tensor] = {}
    _collect(module, "", tensors)
    return tensors


def _direct_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from ((name, value) for name, value in module.named_buffers(recurse=False) if value is not None)


def _collect(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> None:
    if is_forget_layer(module):
        _collect_unedited(module, prefix, tensors)
        return
    tensors.update((prefix + name, value) for name, value in _direct_tensors(module))
    for name, child in module.named_children():
        _collect(child, f"{prefix}{name}.", tensors)


def _collect_unedited(layer: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> None:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    _collect(base, prefix, tensors)
    # a merged layer's base weight holds the edit: the unedited one is the copy kept from before the merge
    if getattr(layer, "mergeable", False) and hasattr(layer, "unedited_weight"):
        weight = layer.unedited_weight()
        own = getattr(base, "weight", None)
        # unmerged, peft hands out `weight.data`: a new tensor object at each call, with a version counter of its
        # own; the parameter itself is what the hash memo can track
        if isinstance(own, Tensor) and weight.data_ptr() == own.data_ptr() and weight.shape == own.shape:
            weight = own
        tensors[prefix + "weight"] = weight
        bias = layer.unedited_bias()
        if bias is not None:
            tensors[prefix + "bias"] = bias


#: id(tensor) → (weak reference, change token, sha256 of its bytes)
_DIGESTS: dict[int, tuple[weakref.ref, tuple, str]] = {}


def tensor_digest(tensor: Tensor) -> str | None:
    """sha256 of ``tensor``'s bytes, memoised by (identity, ``data_ptr``, ``_version``): an in-place change bumps
    ``_version``, a replaced storage moves ``data_ptr``, and the weak reference makes sure a new tensor reusing a
    dead one's ``id`` is hashed anew. ``None`` for a tensor without data (on the meta device)."""
    if tensor.device.type == "meta":
        return None
    tracked = not tensor.is_inference()  # inference tensors have no version counter: hashed every time
    token = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device) if tracked else None
    known = _DIGESTS.get(id(tensor)) if tracked else None
    if known is not None and known[0]() is tensor and known[1] == token:
        return known[2]
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    if tracked:
        identity = id(tensor)
        _DIGESTS[identity] = (weakref.ref(tensor, lambda ref: _forget_digest(identity, ref)), token, digest)
    return digest


def _forget_digest(key: int, ref: weakref.ref) -> None:
    known = _DIGESTS.get(key)
    if known is not None and known[0] is ref:
        del _DIGESTS[key]


def text_path_fingerprint(model: nn.Module, path: TextPath) -> str | None:
    """sha256 of the model class, its text configuration and every tensor of :func:`text_path_tensors` (name,
    dtype, shape, bytes): equal fingerprints mean equal unedited text embeddings for equal token ids. ``None``
    when a tensor has no data (a model on the meta device)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    config = getattr(config, "text_config", None) or config
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    for key in _PROVENANCE_KEYS:
        values.pop(key, None)
    digest = hashlib.sha256(f"{type(base).__module__}.{type(base).__qualname__}".encode())
    digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    tensors = text_path_tensors(base, path)
    for name in sorted(tensors):
        tensor = tensors[name]
        tensor_hash = tensor_digest(tensor)
        if tensor_hash is None:
            return None
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor_hash}".encode())
    return digest.hexdigest()


__all__ = [
    "PROBE_PROMPT",
    "TextPath",
    "base_model",
    "edits_bypassed",
    "forget_layers",
    "is_forget_layer",
    "tensor_digest",
    "text_path",
    "text_path_fingerprint",
    "text_path_in_training",
    "text_path_tensors",
    "text_side_edits",
    "unedited_tensors",
]
