"""Layer 4 — forgetting in stored embedding indexes: the edit of a model's forget adapters applied to embeddings
that the unedited model produced (:func:`edit_embeddings`), exactly, without re-encoding their inputs."""

from .edit import (
    SIDES,
    EmbeddingEdit,
    UneditedSideWarning,
    edit_embeddings,
    embedding_edit,
    load_embedding_edit,
    model_fingerprint,
    unit_rows,
)


__all__ = [
    "SIDES",
    "EmbeddingEdit",
    "UneditedSideWarning",
    "edit_embeddings",
    "embedding_edit",
    "load_embedding_edit",
    "model_fingerprint",
    "unit_rows",
]
