"""Layer 4 — forgetting in stored embedding indexes: the edit of a model's forget adapters applied to embeddings
that the unedited model produced, exactly, without re-encoding their inputs.

* :func:`edit_embeddings` / :func:`embedding_edit` / :func:`load_embedding_edit` — the edit, in memory;
* :func:`edit_index` — a whole index on disk (clip-retrieval, ``.npy``, parquet / Arrow / ``datasets``), streamed
  shard by shard into a new index beside the untouched input, with a provenance record.
"""

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
from .run import IndexEditResult, edit_index
from .shards import PROVENANCE_NAME, IndexLayout, IndexLayoutError, Shard, ShardResult, discover_layout, edit_shard


__all__ = [
    "PROVENANCE_NAME",
    "SIDES",
    "EmbeddingEdit",
    "IndexEditResult",
    "IndexLayout",
    "IndexLayoutError",
    "Shard",
    "ShardResult",
    "UneditedSideWarning",
    "discover_layout",
    "edit_embeddings",
    "edit_index",
    "edit_shard",
    "embedding_edit",
    "load_embedding_edit",
    "model_fingerprint",
    "unit_rows",
]
