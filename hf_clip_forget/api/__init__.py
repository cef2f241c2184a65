"""Layer 3 — the user API: :func:`add_forget_adapter`, :class:`ForgetPeftModel` and :func:`verify_forget_adapter`.

``import hf_clip_forget`` also gives every supported model class (``hf_clip_forget.families``) an
``add_forget_adapter`` method (the same function), so that::

    model = clip.add_forget_adapter(["cat", "dog"], tokenizer=tokenizer)   # a ForgetPeftModel (peft.PeftModel)
    model = model.add_forget_adapter(["truck"], adapter_name="vehicles")   # stacks: both forgotten
    model.merge_adapter(); model.unmerge_adapter()                          # exact round trip
    model.verify()                                                           # stored edits == their classes' edits
"""

from ..tuners.projection_edit.preprocessors import load_from_model_checkpoint, resolve_tokenizer
from .adding import (
    adapter_holder,
    add_forget_adapter,
    forget_config,
    holds_forget_adapters,
    install_model_methods,
)
from .peft_model import ROOT_ADAPTER, ForgetPeftModel
from .verify import VERIFY_TOLERANCE, AdapterVerification, VerificationReport, verify_forget_adapter


__all__ = [
    "ROOT_ADAPTER",
    "VERIFY_TOLERANCE",
    "AdapterVerification",
    "ForgetPeftModel",
    "VerificationReport",
    "adapter_holder",
    "add_forget_adapter",
    "forget_config",
    "holds_forget_adapters",
    "install_model_methods",
    "load_from_model_checkpoint",
    "resolve_tokenizer",
    "verify_forget_adapter",
]
