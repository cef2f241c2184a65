"""Layer 4 — the Hub: model cards, ``push_to_hub`` of adapters and merged models.

Importing it plugs the card writer and the uploader into :class:`hf_clip_forget.ForgetPeftModel`, so that
``save_pretrained`` writes this package's card and ``push_to_hub`` uploads in one commit.
"""

from ..api import ForgetPeftModel
from .card import (
    ForgetEvaluation,
    base_model_id,
    base_model_license,
    build_model_card,
    escape_markdown,
    hub_model_id,
    write_model_card,
)
from .push import HubUploadError, push_to_hub


ForgetPeftModel.model_card_writer = staticmethod(write_model_card)
ForgetPeftModel.hub_uploader = staticmethod(push_to_hub)

__all__ = [
    "ForgetEvaluation",
    "HubUploadError",
    "base_model_id",
    "base_model_license",
    "build_model_card",
    "escape_markdown",
    "hub_model_id",
    "push_to_hub",
    "write_model_card",
]
