"""Where an adapter comes from, as recorded in its config: the base model it was built on and the build's provenance.

The rule for ``base_model_name_or_path``, the same on every path (as peft and LoRA do): the config records where the
base model was loaded from, its ``name_or_path`` — a Hub id or a local directory (:func:`base_model_source`) — and
every local save writes it, so that ``PeftModel.from_pretrained``, ``ForgetPeftModel.from_pretrained`` and
transformers' ``AutoModel.from_pretrained(adapter_dir)`` find the base; a push to the Hub
(:func:`hf_clip_forget.hub.push_to_hub`) writes the base's Hub id instead, or ``null`` when it was not loaded from
the Hub, and refuses to upload any file naming the local directory. Tokenizers are recorded only by shareable id
(:func:`shareable_model_id`): the adapter never needs its tokenizer to load.
"""

from __future__ import annotations

import datetime
import os

import torch

from ..._version import __version__


def base_model_source(model, recorded: str | None = None) -> str | None:
    """What a config records as ``base_model_name_or_path`` for an adapter built on ``model``: where ``model`` was
    loaded from (its ``name_or_path``: a Hub id, or a local directory, as peft records it), else ``recorded`` (the
    value the config already holds) for a model built in memory; ``None`` when neither is known. A push to the Hub
    replaces a local directory by the Hub id or ``null`` (see the module docstring)."""
    return getattr(model, "name_or_path", None) or recorded or None


def shareable_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a Hub repo; ``None`` for a local path, which says nothing to anyone else,
    leaks the author's file system, and whose last component could pass for an unrelated Hub id. Used for what is
    recorded only to be shared (the tokenizer's id), not for ``base_model_name_or_path`` (see
    :func:`base_model_source`)."""
    if not name_or_path:
        return None
    local = os.path.isabs(name_or_path) or os.path.exists(name_or_path) or name_or_path.startswith((".", "~"))
    return None if local else name_or_path


def provenance() -> dict:
    """When and with which library versions an adapter was built."""
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


__all__ = ["base_model_source", "provenance", "shareable_model_id"]
