"""Stored embedding indexes on disk: which files hold the vectors (shards), which are carried over untouched, and how
one shard is read, edited and written.

Layouts (:func:`discover_layout`):

* ``clip-retrieval`` — a folder with ``img_emb/img_emb_<i>.npy`` and/or ``text_emb/text_emb_<i>.npy`` and
  ``metadata/metadata_<i>.parquet`` (what ``clip-retrieval inference`` writes): the chosen side's ``.npy`` files are
  the shards, every other file is carried over;
* ``npy`` — one ``.npy`` file of ``(n, d)`` vectors, or a folder of them;
* ``table`` — one parquet file, a folder of parquet files, or a ``datasets`` dataset saved with ``save_to_disk``
  (Arrow files with ``dataset_info.json`` / ``state.json``), with the vectors in one list column (``column``).

:func:`edit_shard` is a pure function of its arguments (an :class:`~hf_clip_forget.index.edit.EmbeddingEdit`, two
folders, a :class:`Shard`): it reads the shard's bytes once (hashing them as read), edits the vectors, writes the
result under a temporary name and renames it, and returns a :class:`ShardResult`. The same function runs in one
process or on a distributed engine's workers, so their outputs are the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import asdict, dataclass

import numpy as np


#: The file an edited index records what was done in (beside its vectors).
PROVENANCE_NAME = "hf_clip_forget_index.json"
#: clip-retrieval's embedding folders per side.
CLIP_RETRIEVAL_FOLDERS = {"image": "img_emb", "audio": "img_emb", "text": "text_emb"}
TABLE_SUFFIXES = (".parquet", ".arrow")


class IndexLayoutError(ValueError):
    """The input is not an index layout this tool reads, or does not hold what was asked for."""


@dataclass(frozen=True)
class Shard:
    """One file of vectors: its path relative to the index root, its format (``"npy"``, ``"parquet"`` or
    ``"arrow"``) and, for tables, the column holding the vectors."""

    path: str
    format: str
    column: str | None = None


@dataclass(frozen=True)
class IndexLayout:
    """An index on disk: its ``root``, its ``kind`` (``"clip-retrieval"``, ``"npy"``, ``"table"``), the shards of
    the side being edited, in a fixed order, and the files carried over untouched (relative paths)."""

    root: str
    kind: str
    shards: tuple[Shard, ...]
    carried: tuple[str, ...] = ()
    single_file: bool = False


@dataclass(frozen=True)
class ShardResult:
    """What editing one shard did: rows, dimension, whether its rows were unit length, and the sha256 of the bytes
    read (the input file's digest, computed as it is read: no second pass)."""

    path: str
    rows: int
    dim: int
    normalized: bool
    input_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ discovery
def discover_layout(path: str, side: str = "image", column: str | None = None) -> IndexLayout:
    """The :class:`IndexLayout` at ``path`` (see the module docstring); an :class:`IndexLayoutError` naming what was
    found and what is expected otherwise."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise IndexLayoutError(f"No index at {path}: give the folder (or .npy / .parquet file) holding the vectors.")
    if os.path.isfile(path):
        return _single_file(path, column)
    folder = CLIP_RETRIEVAL_FOLDERS.get(side, "img_emb")
    if any(os.path.isdir(os.path.join(path, name)) for name in ("img_emb", "text_emb")):
        return _clip_retrieval(path, folder, side)
    files = _files_under(path)
    tables = [f for f in files if f.endswith(TABLE_SUFFIXES)]
    arrays = [f for f in files if f.endswith(".npy")]
    if tables and arrays:
        raise IndexLayoutError(f"{path} holds both .npy and table files; point at the folder of one of them.")
    if arrays:
        return IndexLayout(path, "npy", tuple(Shard(f, "npy") for f in arrays), _others(files, arrays))
    if tables:
        column = _require_column(column, path)
        shards = tuple(Shard(f, "parquet" if f.endswith(".parquet") else "arrow", column) for f in tables)
        return IndexLayout(path, "table", shards, _others(files, tables))
    raise IndexLayoutError(
        f"{path} holds no .npy, .parquet or .arrow file: expected a clip-retrieval output folder (img_emb/, "
        "text_emb/, metadata/), a folder of .npy files, parquet files or a `datasets` dataset saved to disk."
    )


def _single_file(path: str, column: str | None) -> IndexLayout:
    root, name = os.path.split(path)
    if name.endswith(".npy"):
        return IndexLayout(root, "npy", (Shard(name, "npy"),), single_file=True)
    if name.endswith(TABLE_SUFFIXES):
        fmt = "parquet" if name.endswith(".parquet") else "arrow"
        return IndexLayout(root, "table", (Shard(name, fmt, _require_column(column, path)),), single_file=True)
    raise IndexLayoutError(f"{path}: expected a .npy, .parquet or .arrow file (or a folder of them).")


def _clip_retrieval(path: str, folder: str, side: str) -> IndexLayout:
    files = _files_under(path)
    prefix = folder + "/"
    shards = [f for f in files if f.startswith(prefix) and f.endswith(".npy")]
    if not shards:
        raise IndexLayoutError(
            f"{path} is a clip-retrieval index without {folder}/*.npy, so it holds no {side} embeddings to edit; "
            f"pass the --side it holds."
        )
    return IndexLayout(
        path, "clip-retrieval", tuple(Shard(f, "npy") for f in _numbered(shards)), _others(files, shards)
    )


def _require_column(column: str | None, path: str) -> str:
    if not column:
        raise IndexLayoutError(f"{path} holds tables: name the column holding the vectors (`column=`, --column).")
    return column


def _files_under(root: str) -> list[str]:
    """Every regular file under ``root``, relative, in a fixed order; links are refused (their target is not part
    of the index, and writing through one could modify the input)."""
    found = []
    for current, folders, names in os.walk(root):
        folders.sort()
        for name in sorted(names):
            full = os.path.join(current, name)
            if os.path.islink(full):
                raise IndexLayoutError(f"{full} is a symbolic link; copy the file into the index or remove the link.")
            if name != PROVENANCE_NAME or current != root:
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return found


def _numbered(paths: list[str]) -> list[str]:
    """clip-retrieval's shards in their numeric order (``img_emb_2`` before ``img_emb_10``)."""

    def key(path: str):
        stem = os.path.splitext(os.path.basename(path))[0]
        digits = stem.rsplit("_", 1)[-1]
        return (os.path.dirname(path), int(digits) if digits.isdigit() else -1, stem)

    return sorted(paths, key=key)


def _others(files: list[str], shards: list[str]) -> tuple[str, ...]:
    chosen = set(shards)
    return tuple(f for f in files if f not in chosen)


def shard_dim(root: str, shard: Shard) -> int:
    """The vector dimension of ``shard``, read from its header (``.npy``), its schema or its first vector (tables)
    without reading the shard: so that a mismatch is refused before anything is written."""
    path = os.path.join(root, shard.path)
    if shard.format == "npy":
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape = header[version](handle)[0] if version in header else np.load(path, mmap_mode="r").shape
        if len(shape) != 2:
            raise IndexLayoutError(f"{shard.path}: expected (n, d) vectors, got shape {shape}.")
        return int(shape[1])
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard.format == "parquet":
        first = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
    else:
        first = next(iter(_arrow_reader(pa.memory_map(path))), None)  # mapped: only the first batch is read
    if first is None:
        return 0
    _, vectors = _table_vectors(pa.Table.from_batches([first.slice(0, 1)]), shard)
    return int(vectors.shape[1])


# ------------------------------------------------------------------------------------------------- one shard
class ShardBuffers:
    """Memory reused from shard to shard, one set per thread: the bytes of the shard being read and the array its
    edited vectors are written into. Fresh memory for every shard would cost the kernel a page fault per 4 KiB
    (on this project's 2-core machine about as long as reading the shard); reused, a run holds at most one shard
    of each per worker thread, whatever the index size. Pickles as a new, empty set (a cluster worker makes its
    own)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def input(self, size: int) -> memoryview:
        """``size`` writable bytes."""
        return memoryview(self._grown("input", size))[:size]

    def output(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        return self._grown("output", size)[:size].view(dtype).reshape(shape)

    def _grown(self, name: str, size: int) -> np.ndarray:
        buffer = getattr(self._local, name, None)
        if buffer is None or buffer.size < size:
            setattr(self._local, name, None)  # the old one goes before the larger one is allocated
            buffer = np.empty(max(size, 1), dtype=np.uint8)
            setattr(self._local, name, buffer)
        return buffer


def edit_shard(
    edit, source_root: str, target_root: str, shard: Shard, normalized: bool | None = None, buffers=None
) -> ShardResult:
    """Read ``shard`` under ``source_root``, apply ``edit`` (an ``EmbeddingEdit``) to its vectors, write the result
    at the same relative path under ``target_root`` (temporary name, then rename), and return its
    :class:`ShardResult`. Only the vectors change: a table keeps its other columns, schema and row groups.
    ``buffers`` (a :class:`ShardBuffers`) is memory to reuse across calls; default: new memory for this shard."""
    buffers = buffers or ShardBuffers()
    data, input_sha256 = _read(os.path.join(source_root, shard.path), buffers)
    reader = {"npy": _edit_npy, "parquet": _edit_parquet, "arrow": _edit_arrow}[shard.format]
    parts, rows, dim, unit = reader(edit, data, shard, normalized, buffers)
    target = os.path.join(target_root, shard.path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = target + ".partial"
    with open(temporary, "wb") as handle:
        for part in parts:
            handle.write(part)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the run records the shard as done
    os.replace(temporary, target)
    return ShardResult(shard.path, rows, dim, unit, input_sha256)


def _read(path: str, buffers: ShardBuffers) -> tuple[memoryview, str]:
    """The file's bytes (in ``buffers``' input memory) and their sha256."""
    with open(path, "rb") as handle:
        data = buffers.input(os.fstat(handle.fileno()).st_size)
        filled = 0
        while filled < len(data):
            count = handle.readinto(data[filled:])
            if not count:
                raise IndexLayoutError(f"{path} became shorter while it was read; is another process writing it?")
            filled += count
    return data, hashlib.sha256(data).hexdigest()


def _vectors_of(edit, vectors: np.ndarray, where: str, normalized: bool | None, out=None):
    if vectors.ndim != 2:
        raise IndexLayoutError(f"{where}: expected (n, d) vectors, got shape {vectors.shape}.")
    try:
        return edit.apply_reporting(vectors, normalized, out)
    except ValueError as error:
        raise IndexLayoutError(f"{where}: {error}") from error


def _edit_npy(edit, data: memoryview, shard: Shard, normalized, buffers: ShardBuffers):
    version, shape, fortran, dtype, offset = _npy_header(data)
    if fortran or dtype is None or dtype.hasobject:  # rare layouts: numpy's own reader (one copy more)
        vectors = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        shape, version = vectors.shape, None
    else:
        vectors = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    vectors = np.ascontiguousarray(vectors)
    edited, unit = _vectors_of(edit, vectors, shard.path, normalized, buffers.output(vectors.shape, vectors.dtype))
    header = io.BytesIO()  # the header, then the array's own buffer: no copy of the vectors
    write_header = np.lib.format.write_array_header_2_0 if version == (2, 0) else np.lib.format.write_array_header_1_0
    write_header(header, np.lib.format.header_data_from_array_1_0(edited))
    flat = memoryview(edited.reshape(-1).view(np.uint8))  # bytes (a view; a 0-row shard too)
    return [header.getvalue(), flat], int(shape[0]), int(shape[1]), unit


def _npy_header(data: memoryview) -> tuple:
    """``(version, shape, fortran_order, dtype, data_offset)`` from a ``.npy`` file's bytes, parsing only its header;
    versions other than 1.0 and 2.0 give ``dtype`` ``None`` (read by ``numpy.load`` instead)."""
    length_bytes = {1: 2, 2: 4}.get(data[6] if len(data) > 6 else 0)
    if length_bytes is None:
        return None, None, True, None, 0
    end = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
    stream = io.BytesIO(bytes(data[:end]))
    version = np.lib.format.read_magic(stream)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        return version, None, True, None, 0
    shape, fortran, dtype = read(stream)
    return version, shape, fortran, dtype, stream.tell()


def _table_vectors(table, shard: Shard):
    import pyarrow as pa

    if shard.column not in table.column_names:
        raise IndexLayoutError(f"{shard.path} has no column {shard.column!r}; its columns: {table.column_names}.")
    column = table.column(shard.column).combine_chunks()
    if not (pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)):
        raise IndexLayoutError(f"{shard.path}: column {shard.column!r} is {column.type}, not a list of floats.")
    if column.null_count:
        raise IndexLayoutError(f"{shard.path}: column {shard.column!r} has {column.null_count} missing vectors.")
    values = column.flatten().to_numpy(zero_copy_only=False)
    rows = len(column)
    if rows and values.size % rows:
        raise IndexLayoutError(f"{shard.path}: the vectors of column {shard.column!r} differ in length.")
    return column, values.reshape(rows, values.size // rows if rows else 0)


def _replace_vectors(table, shard: Shard, column, edited: np.ndarray):
    import pyarrow as pa

    flat = pa.array(edited.reshape(-1), type=column.type.value_type)
    if pa.types.is_fixed_size_list(column.type):
        new = pa.FixedSizeListArray.from_arrays(flat, column.type.list_size)
    else:
        offsets = pa.array(np.arange(0, edited.size + 1, edited.shape[1] or 1, dtype=np.int32)[: len(column) + 1])
        new = pa.ListArray.from_arrays(offsets, flat, type=column.type)
    index = table.column_names.index(shard.column)
    return table.set_column(index, table.schema.field(index), new)


def _edit_parquet(edit, data: memoryview, shard: Shard, normalized, buffers: ShardBuffers):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)))
    table = source.read()
    column, vectors = _table_vectors(table, shard)
    edited, unit = _vectors_of(edit, vectors, shard.path, normalized, buffers.output(vectors.shape, vectors.dtype))
    out = io.BytesIO()
    first = source.metadata.row_group(0) if source.metadata.num_row_groups else None
    options = {}
    if first is not None:
        options["row_group_size"] = max(first.num_rows, 1)
        options["compression"] = first.column(0).compression.lower()
    pq.write_table(_replace_vectors(table, shard, column, edited), out, **options)
    return [out.getbuffer()], len(vectors), vectors.shape[1], unit


def _edit_arrow(edit, data: memoryview, shard: Shard, normalized, buffers: ShardBuffers):
    import pyarrow as pa

    reader = _arrow_reader(pa.py_buffer(data))
    writer_for = pa.ipc.new_stream if isinstance(reader, pa.ipc.RecordBatchStreamReader) else pa.ipc.new_file
    table = reader.read_all()
    column, vectors = _table_vectors(table, shard)
    edited, unit = _vectors_of(edit, vectors, shard.path, normalized, buffers.output(vectors.shape, vectors.dtype))
    out = io.BytesIO()
    with writer_for(out, table.schema) as writer:
        writer.write_table(_replace_vectors(table, shard, column, edited))
    return [out.getbuffer()], len(vectors), vectors.shape[1], unit


def _arrow_reader(source):
    """A reader of an Arrow IPC stream (what ``datasets`` writes) or file, from a memory map or a buffer."""
    import pyarrow as pa

    magic = source.read(6) if hasattr(source, "read") else bytes(source[:6])
    if hasattr(source, "seek"):
        source.seek(0)
    return pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
