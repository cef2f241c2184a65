"""Layer 4 — forgetting in stored embedding indexes: the edit of a model's forget adapters applied to embeddings
that the unedited model produced, exactly, without re-encoding their inputs.

* :func:`edit_embeddings` / :func:`embedding_edit` / :func:`load_embedding_edit` — the edit, in memory;
* :func:`edit_index` — a whole index on disk (clip-retrieval, ``.npy``, parquet / Arrow / ``datasets``), streamed
  shard by shard into a new index beside the untouched input, with a provenance record; :func:`ray_mapper` runs its
  shards as Ray tasks (extra ``ray``);
* :func:`faiss_rebuilder` / :func:`edit_faiss_index` — FAISS indexes rebuilt from the edited vectors (extra
  ``faiss``); :func:`edit_lancedb_table` — a LanceDB table edited in place as one new version (extra ``lancedb``).

The engines are imported only when used: the embedded default needs none of them.
"""

from .distributed import ray_mapper
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
from .faiss_index import edit_faiss_index, faiss_rebuilder
from .run import IndexEditResult, edit_index
from .shards import PROVENANCE_NAME, IndexLayout, IndexLayoutError, Shard, ShardResult, discover_layout, edit_shard
from .vector_db import edit_lancedb_table, lancedb_provenance, revert_lancedb_table


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
    "edit_faiss_index",
    "edit_index",
    "edit_lancedb_table",
    "edit_shard",
    "embedding_edit",
    "faiss_rebuilder",
    "lancedb_provenance",
    "load_embedding_edit",
    "model_fingerprint",
    "ray_mapper",
    "revert_lancedb_table",
    "unit_rows",
]
