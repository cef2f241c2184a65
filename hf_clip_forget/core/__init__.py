"""Layer 1 — the math core: prompt templates, text embeddings, bases, projectors, CCUP and their union.

Works on tensors (and on a model only through the embedding functions its family declares); imports nothing from peft.
"""

from .domains import PARADIGMS, DomainCell, DomainPlan, plan_domain_edit
from .factors import EditFactors, build_edit_factors
from .joint_embeddings import embedding_function, image_side_embeddings, text_side_embeddings
from .linear_probe import LinearProbeResult, linear_probe
from .logit_edit import class_dual_vectors, logit_constrained_edit, logit_drops
from .neighbours import find_neighbours, nearest_words, vocabulary_words
from .prototypes import VisualPrototypes, synthesize_prototypes
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
from .templates import (
    DOMAIN_TEMPLATES,
    HELD_OUT_TEMPLATES,
    IMAGENET_TEMPLATES,
    PHOTO_TEMPLATES,
    SINGLE_TEMPLATE,
    SOUND_TEMPLATES,
    TEMPLATE_SETS,
    describe_templates,
    domain_templates,
    fill_templates,
    generic_domain_templates,
    resolve_templates,
)
from .text_embeddings import (
    ClassTextEmbeddings,
    average_templates,
    check_tokenizer_fits,
    class_text_embeddings,
    encode_prompts,
    validate_class_names,
)


__all__ = [
    "DEFAULT_RANK_TOLERANCE",
    "DOMAIN_TEMPLATES",
    "EDIT_METHODS",
    "HELD_OUT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "PARADIGMS",
    "PHOTO_TEMPLATES",
    "SINGLE_TEMPLATE",
    "SOUND_TEMPLATES",
    "TEMPLATE_SETS",
    "ClassTextEmbeddings",
    "DomainCell",
    "DomainPlan",
    "EditFactors",
    "EditSpec",
    "LinearProbeResult",
    "LowRankEdit",
    "VisualPrototypes",
    "average_templates",
    "build_edit_factors",
    "ccup_edit",
    "check_tokenizer_fits",
    "class_dual_vectors",
    "class_text_embeddings",
    "compose_edits",
    "describe_templates",
    "domain_templates",
    "embedding_function",
    "encode_prompts",
    "fill_templates",
    "find_neighbours",
    "generic_domain_templates",
    "gram_factor",
    "image_side_embeddings",
    "linear_probe",
    "logit_constrained_edit",
    "logit_drops",
    "nearest_words",
    "normalize_rows",
    "nullspace_edit",
    "orthonormal_basis",
    "plan_domain_edit",
    "remove_span",
    "resolve_templates",
    "shared_direction",
    "synthesize_prototypes",
    "text_side_embeddings",
    "validate_class_names",
    "vocabulary_words",
]
