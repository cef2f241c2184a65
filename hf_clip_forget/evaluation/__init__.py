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

from .cache import (
    data_files_identity,
    features_cache_dir,
    features_cache_path,
    image_features_key,
    load_or_embed_image_features,
    vision_tower_fingerprint,
)
from .data import LabelledColumns, check_labelled_images, load_labelled_images, resolve_columns
from .features import (
    ImageFeatures,
    embed_images,
    find_visual_projection,
    launched_processes,
    pre_projection_features,
    process_state,
    project_image_features,
)
from .metric import FORGETTING_METRIC_PATH, load_forgetting_metric
from .reports import ForgettingReport, ZeroShotReport, score_predictions
from .zero_shot import class_embeddings, evaluate_edit, evaluate_zero_shot, zero_shot_logits


__all__ = [
    "FORGETTING_METRIC_PATH",
    "ForgettingReport",
    "ImageFeatures",
    "LabelledColumns",
    "ZeroShotReport",
    "check_labelled_images",
    "class_embeddings",
    "data_files_identity",
    "embed_images",
    "evaluate_edit",
    "evaluate_zero_shot",
    "features_cache_dir",
    "features_cache_path",
    "find_visual_projection",
    "image_features_key",
    "launched_processes",
    "load_forgetting_metric",
    "load_labelled_images",
    "load_or_embed_image_features",
    "pre_projection_features",
    "process_state",
    "project_image_features",
    "resolve_columns",
    "score_predictions",
    "vision_tower_fingerprint",
    "zero_shot_logits",
]
