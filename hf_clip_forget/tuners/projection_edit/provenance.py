"""Where an adapter comes from, as recorded in its config: a shareable base model id and the build's provenance."""

from __future__ import annotations

import datetime
import os

import torch

from ..._version import __version__


def shareable_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a Hub repo; ``None`` for a local path, which says nothing to anyone else,
    leaks the author's file system, and whose last component could pass for an unrelated Hub id."""
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


__all__ = ["provenance", "shareable_model_id"]
