"""Layer 1 — the math core: prompt templates, text embeddings, bases, projectors, CCUP and their union.

Works on tensors (and on a model only through ``get_text_features``); imports nothing from peft.
"""

from .factors import EditFactors, build_edit_factors
from .subspace import (
    DEFAULT_RANK_TOLERANCE,
    EDIT_METHODS,
    EditSpec,
    LowRankEdit,
    ccup_edit,
    compose_edits,
    gram_factor,
    normalize_rows,
    nullspace_edit,
    orthonormal_basis,
    remove_span,
    shared_direction,
)
from .templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE, TEMPLATE_SETS, fill_templates, resolve_templates
from .text_embeddings import (
    ClassTextEmbeddings,
    check_tokenizer_fits,
    class_text_embeddings,
    encode_prompts,
    validate_class_names,
)


__all__ = [
    "DEFAULT_RANK_TOLERANCE",
    "EDIT_METHODS",
    "IMAGENET_TEMPLATES",
    "SINGLE_TEMPLATE",
    "TEMPLATE_SETS",
    "ClassTextEmbeddings",
    "EditFactors",
    "EditSpec",
    "LowRankEdit",
    "build_edit_factors",
    "ccup_edit",
    "check_tokenizer_fits",
    "class_text_embeddings",
    "compose_edits",
    "encode_prompts",
    "fill_templates",
    "gram_factor",
    "normalize_rows",
    "nullspace_edit",
    "orthonormal_basis",
    "remove_span",
    "resolve_templates",
    "shared_direction",
    "validate_class_names",
]
