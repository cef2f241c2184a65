"""Samples of a stored index: labelled, for auditing what the index still finds (:func:`labelled_sample`), or not,
for estimating what its classes look like (:func:`stored_sample`).

An index holds vectors, not classes; auditing retrieval needs each audited vector's class. It is read from a column
the index already has: a table layout's own column, or the clip-retrieval ``metadata/metadata_<i>.parquet`` rows that
belong to ``img_emb/img_emb_<i>.npy`` (the same order, as ``clip-retrieval inference`` writes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .shards import IndexLayout, IndexLayoutError, Shard


@dataclass(frozen=True)
class LabelledSample:
    """Stored vectors with their classes: ``vectors`` ``(n, d)`` float32, ``labels`` ``(n,)`` indices into
    ``class_names`` (sorted), and the number of vectors the index holds."""

    vectors: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    total: int


def labelled_sample(layout: IndexLayout, label_column: str, max_vectors: int = 20_000) -> LabelledSample:
    """Up to ``max_vectors`` vectors of ``layout``, evenly spaced over the whole index, with their class names from
    ``label_column``; one shard in memory at a time."""
    vectors, names, total = [], [], 0
    for shard, rows, keep in _spaced_rows(layout, max_vectors):
        total += rows
        if not keep.size:
            continue
        vectors.append(torch.from_numpy(np.asarray(_vectors(layout, shard)[keep], dtype=np.float32)))
        names.extend(_labels(layout, shard, label_column, rows)[i] for i in keep)
    if not names:
        raise IndexLayoutError(f"{layout.root} holds no vectors to audit.")
    class_names = tuple(sorted(set(names)))
    position = {name: index for index, name in enumerate(class_names)}
    labels = torch.tensor([position[name] for name in names], dtype=torch.long)
    return LabelledSample(torch.cat(vectors), labels, class_names, total)


def stored_sample(layout: IndexLayout, max_vectors: int = 20_000) -> Tensor:
    """Up to ``max_vectors`` vectors of ``layout`` (float32), evenly spaced over the whole index, the same rows on
    every call; one shard in memory at a time."""
    vectors = [
        torch.from_numpy(np.asarray(_vectors(layout, shard)[keep], dtype=np.float32))
        for shard, _, keep in _spaced_rows(layout, max_vectors)
        if keep.size
    ]
    if not vectors:
        raise IndexLayoutError(f"{layout.root} holds no vectors.")
    return torch.cat(vectors)


def _spaced_rows(layout: IndexLayout, max_vectors: int):
    """``(shard, its rows, the row numbers kept)`` for every shard, keeping every ``step``-th row of the whole index
    (``step`` the fewest that keeps at most ``max_vectors``)."""
    if max_vectors < 1:
        raise ValueError(f"The sample must hold at least one vector, got max_vectors={max_vectors}.")
    totals = [_rows(layout, shard) for shard in layout.shards]
    step, offset = max(1, -(-sum(totals) // max_vectors)), 0
    for shard, rows in zip(layout.shards, totals, strict=True):
        keep = np.arange((-offset) % step, rows, step)
        offset += rows
        yield shard, rows, keep


def _rows(layout: IndexLayout, shard: Shard) -> int:
    path = os.path.join(layout.root, shard.path)
    if shard.format == "npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    return len(_table(path, shard.format))


def _vectors(layout: IndexLayout, shard: Shard) -> np.ndarray:
    from .shards import _table_vectors

    path = os.path.join(layout.root, shard.path)
    if shard.format == "npy":
        return np.load(path, mmap_mode="r")
    return _table_vectors(_table(path, shard.format), shard)[1]


def _labels(layout: IndexLayout, shard: Shard, column: str, rows: int) -> list[str]:
    if shard.format != "npy":
        table = _table(os.path.join(layout.root, shard.path), shard.format)
    elif layout.kind == "clip-retrieval":
        table = _table(_metadata_of(layout, shard), "parquet")
    else:
        raise IndexLayoutError(
            f"{shard.path} is a bare .npy file: its vectors have no labels to audit with. Audit a clip-retrieval "
            "folder (labels in metadata/*.parquet) or a table layout (labels in a column of the same table)."
        )
    if column not in table.column_names:
        raise IndexLayoutError(f"No column {column!r} to read labels from in {shard.path}'s table; its columns: "
                               f"{table.column_names}.")  # fmt: skip
    labels = [str(value) for value in table.column(column).to_pylist()]
    if len(labels) != rows:
        raise IndexLayoutError(f"{shard.path} holds {rows} vectors but its labels {len(labels)}: they do not belong "
                               "together.")  # fmt: skip
    return labels


def _metadata_of(layout: IndexLayout, shard: Shard) -> str:
    """clip-retrieval's ``metadata/metadata_<i>.parquet`` of ``img_emb/img_emb_<i>.npy`` (or ``text_emb_<i>``)."""
    number = os.path.splitext(os.path.basename(shard.path))[0].rsplit("_", 1)[-1]
    path = os.path.join(layout.root, "metadata", f"metadata_{number}.parquet")
    if not os.path.isfile(path):
        raise IndexLayoutError(f"{shard.path} has no metadata/metadata_{number}.parquet to read its labels from.")
    return path


def _table(path: str, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .shards import _arrow_reader

    return pq.read_table(path) if fmt == "parquet" else _arrow_reader(pa.memory_map(path)).read_all()
