"""Layer 4 — zero-shot evaluation of forgetting: labelled image sets, cached image features, before/after reports.

::

    from hf_clip_forget.evaluation import evaluate_edit, load_labelled_images

    dataset = load_labelled_images("../shared/data/pacs/test.parquet")        # image + ClassLabel (+ domain)
    report = evaluate_edit(model, dataset, image_processor=processor, tokenizer=tokenizer)
    report.after.forget_accuracy, report.to_dict()                            # {"before": {...}, "after": {...}}

The vision tower runs once per image: its pre-projection features are cached (:class:`ImageFeatures`) and every
version of the model (before/after an edit of ``visual_projection``) projects them with its own projection layer.
Accuracies come from the ``forgetting_accuracy`` `evaluate` metric shipped here (:func:`load_forgetting_metric`).
"""

from .data import LabelledColumns, check_labelled_images, load_labelled_images, resolve_columns
from .metric import FORGETTING_METRIC_PATH, load_forgetting_metric
from .zero_shot import (
    ForgettingReport,
    ImageFeatures,
    ZeroShotReport,
    class_embeddings,
    embed_images,
    evaluate_edit,
    evaluate_zero_shot,
    find_visual_projection,
    pre_projection_features,
    project_image_features,
    score_predictions,
    zero_shot_logits,
)


__all__ = [
    "FORGETTING_METRIC_PATH",
    "ForgettingReport",
    "ImageFeatures",
    "LabelledColumns",
    "ZeroShotReport",
    "check_labelled_images",
    "class_embeddings",
    "embed_images",
    "evaluate_edit",
    "evaluate_zero_shot",
    "find_visual_projection",
    "load_forgetting_metric",
    "load_labelled_images",
    "pre_projection_features",
    "project_image_features",
    "resolve_columns",
    "score_predictions",
    "zero_shot_logits",
]
