"""hf_clip_forget — training-free, data-free class unlearning for CLIP-style dual encoders, as a peft adapter.

Give class names; a closed-form projection of the model's projection layers removes those classes from zero-shot
recognition and keeps everything else. The edit is a peft adapter (``ProjectionEditConfig``, registered with peft
when this package is imported) that can be merged, exactly unmerged, stacked, saved and loaded::

    import hf_clip_forget
    model = clip.add_forget_adapter(["cat"], tokenizer=tokenizer)     # a peft.PeftModel
    model.save_pretrained("clip-without-cats")

The package is layered; each layer imports only from the ones above it in this list:

1. ``core/``     — math on tensors: templates, text embeddings, bases, projectors, CCUP, union, domain cells and
   visual prototypes (no peft);
2. ``tuners/``   — peft glue: ``ProjectionEditConfig``, the layer, the tuner, their registration;
3. ``api/``      — the user API: ``add_forget_adapter``, ``ForgetPeftModel``, ``verify_forget_adapter``;
4. ``hub/``      — model cards and ``push_to_hub`` (plugs into ``ForgetPeftModel``); ``evaluation/`` — the
   zero-shot harness and detection counts (imported on demand: it loads ``evaluate``); ``audit/`` — probes that try
   to get a forgotten class back (``audit_forgetting``, also ``ForgetPeftModel.audit_forgetting``); ``calibration/``
   — the edit's strength chosen on a labelled validation set for a budget (``calibrate_forget_adapter``);
   ``index/`` — the edit applied to stored embedding indexes without re-encoding (``edit_embeddings``,
   ``edit_index``; a cluster engine, FAISS and LanceDB as extras);
5. ``cli/``      — the ``hf-clip-forget`` command.

``models/`` sits beside ``core/``: transformers-native towers and the embedded demo dual encoder.

``testing_utils.py`` builds tiny random models and tokenizers for tests and examples (no downloads).
"""

from . import models  # noqa: F401  (registers the demo model's towers with transformers' Auto classes)
from ._version import __version__
from .api import ForgetPeftModel, VerificationReport, add_forget_adapter, install_model_methods, verify_forget_adapter
from .core import DOMAIN_TEMPLATES, IMAGENET_TEMPLATES, SINGLE_TEMPLATE, LowRankEdit, synthesize_prototypes
from .core.tokenizer_checks import UnknownNameWarning
from .hub import ForgetEvaluation, HubUploadError, push_to_hub
from .tuners import ProjectionEditConfig, ProjectionEditModel
from .tuners.projection_edit.estimate import WeakEditWarning


install_model_methods()


def audit_forgetting(model, tokenizer=None, **options):
    """See :func:`hf_clip_forget.audit.audit_forgetting` (imported on first use: it loads the evaluation layer)."""
    from .audit import audit_forgetting as audit

    return audit(model, tokenizer, **options)


ForgetPeftModel.auditor = staticmethod(audit_forgetting)


def calibrate_forget_adapter(model, classes, tokenizer=None, **options):
    """See :func:`hf_clip_forget.calibration.calibrate_forget_adapter` (imported on first use: it loads the evaluation
    layer). Returns ``(model, report)``: the model with the adapter at the chosen strength, and the
    :class:`~hf_clip_forget.calibration.CalibrationReport`."""
    from .calibration import calibrate_forget_adapter as calibrate

    return calibrate(model, classes, tokenizer, **options)


__all__ = [
    "DOMAIN_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "SINGLE_TEMPLATE",
    "ForgetEvaluation",
    "ForgetPeftModel",
    "HubUploadError",
    "LowRankEdit",
    "ProjectionEditConfig",
    "ProjectionEditModel",
    "UnknownNameWarning",
    "VerificationReport",
    "WeakEditWarning",
    "__version__",
    "add_forget_adapter",
    "audit_forgetting",
    "calibrate_forget_adapter",
    "push_to_hub",
    "synthesize_prototypes",
    "verify_forget_adapter",
]
