"""Layer 4 — zero-shot evaluation of forgetting: labelled image sets, cached image features, before/after reports.

::

    from hf_clip_forget.evaluation import evaluate_edit, load_labelled_images

    dataset = load_labelled_images("../shared/data/pacs/test.parquet")        # image + ClassLabel (+ domain)
    report = evaluate_edit(model, dataset, image_processor=processor, tokenizer=tokenizer)
    report.after.forget_accuracy, report.to_dict()                            # {"before": {...}, "after": {...}}

The image side runs once per image: the input of its image-side layer (for an output-edit family: its unedited
embedding) is cached (:class:`ImageFeatures`), and every version of the model (before/after an edit) projects it as
it is now (:mod:`~hf_clip_forget.evaluation.representation`).
Accuracies come from the ``forgetting_accuracy`` `evaluate` metric shipped here (:func:`load_forgetting_metric`).
Open-vocabulary detectors are evaluated by counting boxes per query instead (:func:`evaluate_detection`).
"""

from .cache import (
    data_files_identity,
    features_cache_dir,
    features_cache_path,
    image_features_key,
    load_or_embed_image_features,
    vision_tower_fingerprint,
)
from .data import LabelledColumns, check_labelled_images, first_per_cell, load_labelled_images, resolve_columns
from .detection import DETECTOR_CLASSES, DetectionReport, detector_family, evaluate_detection
from .features import embed_images, launched_processes, process_state
from .metric import FORGETTING_METRIC_PATH, load_forgetting_metric
from .reports import ForgettingReport, ZeroShotReport, score_predictions
from .representation import (
    ImageFeatures,
    find_visual_projection,
    image_representation,
    pre_projection_features,
    project_image_features,
)
from .zero_shot import class_embeddings, evaluate_edit, evaluate_zero_shot, zero_shot_logits


__all__ = [
    "DETECTOR_CLASSES",
    "FORGETTING_METRIC_PATH",
    "DetectionReport",
    "ForgettingReport",
    "ImageFeatures",
    "LabelledColumns",
    "ZeroShotReport",
    "check_labelled_images",
    "class_embeddings",
    "data_files_identity",
    "detector_family",
    "embed_images",
    "evaluate_detection",
    "evaluate_edit",
    "evaluate_zero_shot",
    "features_cache_dir",
    "features_cache_path",
    "find_visual_projection",
    "first_per_cell",
    "image_features_key",
    "image_representation",
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
