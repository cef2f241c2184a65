"""A model's joint embeddings, computed the way its family declares them (:mod:`hf_clip_forget.families`).

Every model-facing computation of the library (prompt embeddings, the evaluation harness, prototypes, the tests)
goes through :func:`joint_embeddings`, so that a family whose embedding is not simply ``get_image_features`` (FLAVA's
first token, BLIP retrieval's projection heads, OWL detectors' text queries) is handled in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor, nn

from ..families import EmbeddingSide, find_family


_DEFAULT_METHODS = {"visual": "get_image_features", "text": "get_text_features"}


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attribute(model: nn.Module, dotted: str):
    target = model
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def _tensor(output) -> Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output holds the projected features
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


def _parameters(method) -> set[str]:
    # a tower is a module: its signature is forward's (a module's own call signature is `*args, **kwargs`)
    return set(inspect.signature(method.forward if isinstance(method, nn.Module) else method).parameters)


def embedding_side(model: nn.Module, target: str) -> EmbeddingSide:
    """The declared :class:`EmbeddingSide` of ``model`` for ``target`` (``"visual"`` or ``"text"``); a plain
    ``get_*_features`` side for a model outside the family table (a custom dual encoder used for prompts only)."""
    family = find_family(model)
    if family is None:
        return EmbeddingSide("", features=_DEFAULT_METHODS[target])
    return family.side(target)


def embedding_function(model: nn.Module, target: str) -> Callable[..., Tensor]:
    """``f(**inputs) -> (batch, d)`` unnormalised joint embeddings of ``target`` (``"visual"`` or ``"text"``) for
    ``model`` (a transformers model or a peft wrapper of one, with its active adapters).

    ``inputs`` are the tokenizer's or processor's outputs; keys the underlying method does not take
    (``token_type_ids`` for a model that has none) are dropped.
    """
    side = embedding_side(model, target)
    base = _unwrapped(model)
    if side.features is not None:
        method = _attribute(base, side.features)
        project = None
    else:
        method = _attribute(base, side.tower)
        project = _attribute(base, side.module)
    parameters = _parameters(method)

    def embed(**inputs) -> Tensor:
        # only named parameters: a `**kwargs` of transformers methods is for attention options, not other inputs
        output = method(**{key: value for key, value in inputs.items() if key in parameters})
        if project is not None:
            return project(output.last_hidden_state[:, side.token])
        embeddings = _tensor(output)
        if side.token is not None and embeddings.ndim == 3:
            embeddings = embeddings[:, side.token]
        return embeddings

    return embed


def accepted_inputs(model: nn.Module, target: str) -> set[str]:
    """The keyword arguments the embedding function of ``target`` passes on (others are dropped)."""
    side = embedding_side(model, target)
    method = _attribute(_unwrapped(model), side.features if side.features is not None else side.tower)
    return _parameters(method)


def image_side_embeddings(model: nn.Module, **inputs) -> Tensor:
    """The image-side (or audio-side) joint embeddings of ``model`` for processor outputs ``inputs``."""
    return embedding_function(model, "visual")(**inputs)


def text_side_embeddings(model: nn.Module, **inputs) -> Tensor:
    """The text-side joint embeddings of ``model`` for tokenizer outputs ``inputs``."""
    return embedding_function(model, "text")(**inputs)


__all__ = ["accepted_inputs", "embedding_function", "embedding_side", "image_side_embeddings", "text_side_embeddings"]
