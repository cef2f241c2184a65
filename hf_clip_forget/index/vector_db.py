"""A LanceDB table's stored vectors edited in place, through LanceDB's own client, as one new table version.

LanceDB (``pip install 'hf-clip-forget[lancedb]'``) runs in-process and keeps every version of a table: a write
never changes the version it started from, it adds a new one, and the new version becomes visible only when the
whole write is committed. :func:`edit_lancedb_table` uses that:

1. it opens the table, pins the latest version ``N`` for reading and refuses — before anything is written — a
   table whose vector column this tool already edited (its record is there), a column that is missing or not a
   fixed-size list of floats, and vectors of another dimension than the edit's;
2. it tags version ``N`` (``hf-clip-forget-before-vN``), so that ``cleanup_old_versions`` keeps it for reverting;
3. it streams version ``N`` batch by batch (``batch_size`` rows in memory), applies the edit to the vector column
   of each batch, keeps every other column as it is, and writes the batches as one overwrite of the table: version
   ``N + 1``, whose vector column's field metadata holds the provenance record (key :data:`PROVENANCE_KEY`, a
   JSON object built like ``edit_index``'s ``hf_clip_forget_index.json``);
4. it recreates the table's indexes (an overwrite drops them): the same names, types and columns, a vector index
   with its distance type and compression, trained on the edited vectors (the other settings: LanceDB's defaults).

Guarantee: in version ``N + 1`` each row's vector is ``edit.apply`` of that row's vector in version ``N``, bit for
bit (same dtype; every other column unchanged), so the table holds what re-encoding every row's input with the
edited model stores (``edit_embeddings``' guarantee).

Killed midway (or any error, such as a row without a vector or a mix of unit-length and other rows): nothing was
committed, readers still see version ``N`` unedited, and running again starts over (the data files of the
unfinished write are unreferenced; ``table.cleanup_old_versions()`` removes them). Killed after the commit but
while indexes are recreated: the data is edited and recorded; recreate the missing indexes with
``table.create_index``. Reverting: :func:`revert_lancedb_table` (``table.restore(N)``: a new version equal to
``N``, its indexes included). Concurrent writers: an overwrite replaces the table, so a write that another process
commits while the edit runs is not part of the edited version — the edit then raises, naming those versions.
"""

from __future__ import annotations

import inspect
import itertools
import json
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._version import __version__
from .edit import EmbeddingEdit, unit_rows


#: The key of the vector column's field metadata that holds the provenance record of an edited table.
PROVENANCE_KEY = "hf_clip_forget"
#: The tag of the version an edit read (``hf-clip-forget-before-v<N>``).
TAG_PREFIX = "hf-clip-forget-before-v"
INSTALL_HINT = "pip install 'hf-clip-forget[lancedb]'"


@dataclass(frozen=True)
class TableEditResult:
    """What :func:`edit_lancedb_table` did: the table, the version it read, the version it wrote, the provenance
    record (also in the table), the indexes it recreated and how long it took."""

    uri: str
    table: str
    version_before: int
    version: int
    provenance: dict
    indices: tuple[str, ...]
    seconds: float

    @property
    def vectors(self) -> int:
        return self.provenance["vectors"]


def edit_batches(edit: EmbeddingEdit, batches: Iterable[np.ndarray], normalized: bool | None = None) -> Iterator:
    """``(edited rows, unit)`` for each ``(n, d)`` numpy batch, with one decision for all of them: whether
    the rows are unit length (so that edited rows are renormalised) is ``normalized`` or, when ``None``, decided on
    the first batch holding a non-zero row; every later batch must agree (a mix is refused with a ``ValueError``,
    as ``edit_index`` refuses a mix of shards). ``unit`` of the last batch is the decision."""
    decided = normalized
    for rows in batches:
        if normalized is None and bool((rows != 0).any()):
            with warnings.catch_warnings():  # read-only buffers (Arrow, memory maps) are only read
                warnings.simplefilter("ignore", UserWarning)
                unit = unit_rows(torch.from_numpy(np.asarray(rows)))
            if decided is not None and unit != decided:
                raise ValueError(
                    "Some rows are unit length and others are not, so whether to renormalise the edited rows "
                    "cannot be decided. Pass normalized=True (the vectors are meant to be L2-normalised) or "
                    "normalized=False (--normalized / --raw)."
                )
            decided = unit
        yield edit.apply(rows, normalized=bool(decided)), bool(decided)


def edit_lancedb_table(
    edit: EmbeddingEdit,
    uri: str,
    table_name: str,
    vector_column: str = "vector",
    *,
    normalized: bool | None = None,
    batch_size: int = 8192,
    rebuild_indices: bool = True,
    show_progress: bool = True,
) -> TableEditResult:
    """Apply ``edit`` to the ``vector_column`` of the LanceDB table ``table_name`` at ``uri``, in place, as one new
    version (see the module docstring for the guarantee, what a kill leaves and how to revert). Everything that can
    be refused without reading the rows (an edited table, the column, the dimension) is refused before any write.

    Args:
        edit: the :class:`~hf_clip_forget.index.EmbeddingEdit` (``embedding_edit(model, side)``).
        uri: the database (``lancedb.connect(uri)``: a local folder or an object-store URI).
        table_name: the table holding the vectors.
        vector_column: the column of vectors (fixed-size lists of float16/float32/float64, as LanceDB stores them).
        normalized: whether the stored vectors are unit length (default: decided from the first batch; all batches
            must agree).
        batch_size: rows read, edited and handed to the writer at a time.
        rebuild_indices: recreate the indexes the overwrite drops (their names, types, columns and, for a vector
            index, distance type and compression; trained on the edited vectors).
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    lancedb = _import_lancedb()
    database = lancedb.connect(uri)
    table = _open_table(database, uri, table_name)
    before = table.version
    source = database.open_table(table_name)
    source.checkout(before)  # every batch is read from version N, whatever is committed meanwhile
    schema = source.schema
    dim = _check_column(schema, vector_column, edit, f"{uri}::{table_name}")
    rows = source.count_rows()
    read = []  # the record batch whose vectors `edited` yields next

    def arrays():
        for batch in source.search().to_batches(batch_size=batch_size):
            read.append(batch)
            yield _vectors(batch, vector_column, dim)

    edited = edit_batches(edit, arrays(), normalized)
    peeked = next(edited, None)  # the first batch decides `normalized`: the record is committed with the data
    indices = [_index_record(index) for index in source.list_indices()]
    record = _provenance(edit, uri, table_name, vector_column, before, rows, dim, peeked, indices)
    items = itertools.chain([peeked], edited) if peeked is not None else iter(())
    target_schema = _with_record(schema, vector_column, record)
    version = _overwrite(table, before, items, read, target_schema, vector_column, rows, show_progress)
    _refuse_concurrent_writes(table, before, version)
    recreated = _recreate_indices(lancedb, table, indices) if rebuild_indices else ()
    return TableEditResult(str(uri), table_name, before, version, record, recreated, time.perf_counter() - started)


def _overwrite(table, before: int, items, read: list, schema, vector_column: str, rows: int, show: bool) -> int:
    """Tag version ``before``, write the edited batches as one overwrite of the table, and return its version; on
    any failure nothing is committed, the tag is removed, and the batches' own error is raised."""
    import pyarrow as pa

    tag = _tag(table, before)
    progress = _progress(rows, show)
    failures = []  # what stopped the batches: LanceDB reports it as a RuntimeError of its own
    try:
        batches = _batches(items, read, schema, vector_column, rows, progress, failures)
        return table.add(pa.RecordBatchReader.from_batches(schema, batches), mode="overwrite").version
    except BaseException as error:
        _untag(table, tag, before)
        if failures and failures[0] is not error:
            raise failures[0] from None
        raise
    finally:
        progress.close()


def lancedb_provenance(uri: str, table_name: str, vector_column: str = "vector") -> dict | None:
    """The provenance record of the latest version of a table :func:`edit_lancedb_table` edited, else ``None``."""
    table = _open_table(_import_lancedb().connect(uri), uri, table_name)
    return _record_of(table.schema, vector_column)


def revert_lancedb_table(uri: str, table_name: str, vector_column: str = "vector") -> int:
    """Make the version an edit read the latest again (``table.restore``: a new version equal to it, indexes
    included, no data copied) and return the new version number. Refuses a table whose latest version is not an
    edited one (nothing to revert)."""
    table = _open_table(_import_lancedb().connect(uri), uri, table_name)
    record = _record_of(table.schema, vector_column)
    if record is None:
        raise ValueError(f"{uri}::{table_name} (version {table.version}) is not an edited table: nothing to revert.")
    table.restore(record["input"]["version"])
    return table.version


# ------------------------------------------------------------------------------------------------------ checks
def _import_lancedb():
    try:
        import lancedb
    except ImportError as error:
        raise ImportError(f"Editing a LanceDB table needs lancedb: {INSTALL_HINT}.") from error
    return lancedb


def _open_table(database, uri: str, table_name: str):
    try:
        return database.open_table(table_name)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        names = list(database.list_tables().tables)
        raise ValueError(f"{uri} has no table {table_name!r} (its tables: {names}); pass --table with one of "
                         "them.") from error  # fmt: skip


def _check_column(schema, vector_column: str, edit: EmbeddingEdit, where: str) -> int:
    """The dimension of the vector column, after refusing a missing column, one that is not a fixed-size list of
    floats (LanceDB's writer turns a variable-length list of floats into ``fixed_size_list<float32>``, so the
    edited version could not keep its type), another dimension, and a table already edited."""
    import pyarrow as pa

    if vector_column not in schema.names:
        raise ValueError(f"{where} has no column {vector_column!r}; its columns: {schema.names}. Pass --column.")
    field = schema.field(vector_column)
    kind = field.type
    if not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
        raise ValueError(
            f"{where}: column {vector_column!r} is {kind}, not a fixed-size list of floats, and LanceDB would write "
            "it back as another type. Cast it first: table.alter_columns({'path': column, 'data_type': "
            "pa.list_(pa.float32(), d)})."
        )
    record = _record_of(schema, vector_column)
    if record is not None:
        raise ValueError(
            f"{where} is already an edited table (it forgets {record.get('edit', {}).get('forgotten')}, read from "
            f"version {record.get('input', {}).get('version')}); editing it again would apply a second edit on top "
            "of the first. Revert it (revert_lancedb_table) and edit once with every adapter active."
        )
    dim = kind.list_size
    if dim != edit.dim:
        raise ValueError(
            f"{where}: column {vector_column!r} holds {dim}-dimensional vectors, but the adapter edits {edit.dim}-"
            f"dimensional {edit.side} embeddings: the table was made by another model (or holds the other side). "
            "Load the base model that made it, and check --side."
        )
    return dim


def _record_of(schema, vector_column: str) -> dict | None:
    if vector_column not in schema.names:
        return None
    metadata = schema.field(vector_column).metadata or {}
    value = metadata.get(PROVENANCE_KEY.encode())
    return json.loads(value) if value else None


def _refuse_concurrent_writes(table, before: int, version: int) -> None:
    if version != before + 1:
        others = f"{before + 1}" if version == before + 2 else f"{before + 1} to {version - 1}"
        raise RuntimeError(
            f"Version {others} was committed by another writer while the edit ran; the edited "
            f"version {version} replaced the table and does not hold their changes. Restore version {version - 1} "
            f"(table.restore({version - 1})) and edit again when no one else writes."
        )


# ------------------------------------------------------------------------------------------------------ batches
def _vectors(batch, vector_column: str, dim: int) -> np.ndarray:
    column = batch.column(batch.schema.get_field_index(vector_column))
    if column.null_count:
        raise ValueError(f"Column {vector_column!r} has {column.null_count} rows without a vector in this batch: "
                         "fill or delete them first (the table was not changed).")  # fmt: skip
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


def _batches(items, read: list, schema, vector_column: str, rows: int, progress, failures: list):
    """The record batches of the new version: each batch read, its vector column replaced by the edited vectors;
    a read that ends short of the ``rows`` of the pinned version raises before the commit. An error is also put in
    ``failures``, to be raised as it is rather than as the writer reports it."""
    try:
        yield from _edited_record_batches(items, read, schema, vector_column, rows, progress)
    except Exception as error:
        failures.append(error)
        raise


def _edited_record_batches(items, read: list, schema, vector_column: str, rows: int, progress):
    import pyarrow as pa

    written = 0
    kind = schema.field(vector_column).type
    for after, _ in items:
        batch = read.pop(0)
        flat = pa.array(np.ascontiguousarray(after).reshape(-1), type=kind.value_type)
        column = pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
        columns = [column if name == vector_column else batch.column(name) for name in schema.names]
        written += batch.num_rows
        progress.update(batch.num_rows)
        yield pa.RecordBatch.from_arrays(columns, schema=schema)
    if written != rows:
        raise RuntimeError(f"Read {written} rows of a table version holding {rows}: the edit was not committed.")


# ------------------------------------------------------------------------------------------------------ record
def _provenance(edit, uri, table_name, vector_column, before, rows, dim, peeked, indices) -> dict:
    """The record committed with the edited vectors, built like ``edit_index``'s: the input is version ``before``
    of the table (a version never changes, so it identifies the vectors read as a digest would)."""
    return {
        "format": 1,
        "tool": f"hf_clip_forget {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edit": edit.to_dict(),
        "input": {
            "uri": str(uri),
            "table": table_name,
            "layout": "lancedb",
            "column": vector_column,
            "version": before,
            "tag": f"{TAG_PREFIX}{before}",
        },  # fmt: skip
        "output": {"in_place": True, "indices_recreated": [index["name"] for index in indices]},
        "vectors": rows,
        "dim": dim,
        "normalized": bool(peeked[1]) if peeked is not None else False,
        "revert": f"table.restore({before}) (hf_clip_forget.index.vector_db.revert_lancedb_table), or check out the "
        f"tag {TAG_PREFIX}{before}.",
    }


def _with_record(schema, vector_column: str, record: dict):
    position = schema.get_field_index(vector_column)
    field = schema.field(position)
    metadata = {**(field.metadata or {}), PROVENANCE_KEY.encode(): json.dumps(record).encode()}
    return schema.set(position, field.with_metadata(metadata))


def _tag(table, version: int) -> str:
    name = f"{TAG_PREFIX}{version}"
    if name not in table.tags.list():  # a run killed before its commit left it: the same version, kept
        table.tags.create(name, version)
    return name


def _untag(table, name: str, version: int) -> None:
    """A failed write leaves version ``version`` the latest: its tag is not needed to revert anything."""
    try:
        if table.version == version:
            table.tags.delete(name)
    except Exception:  # noqa: BLE001 - the write's own error is the one to report
        pass


def _progress(rows: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=rows, unit="vector", desc="Editing table", disable=not show)


# ------------------------------------------------------------------------------------------------------ indexes
def _index_record(index) -> dict:
    return {"name": index.name, "type": index.index_type, "columns": list(index.columns),
            "details": dict(index.index_details or {})}  # fmt: skip


def _recreate_indices(lancedb, table, indices: list[dict]) -> tuple[str, ...]:
    """Create again the indexes the overwrite dropped: same name, type and column, the settings their details
    record that the config takes (a vector index: distance type, PQ sub-vectors and bits), trained on the edited
    vectors. An index of a type this LanceDB cannot configure is left out with a warning."""
    recreated = []
    for index in indices:
        config_class = getattr(lancedb.index, index["type"], None)
        if config_class is None or len(index["columns"]) != 1:
            warnings.warn(f"Index {index['name']} ({index['type']} on {index['columns']}) was not recreated: "
                          "create it again with table.create_index.", stacklevel=3)  # fmt: skip
            continue
        table.create_index(index["columns"][0], config=config_class(**_config_options(config_class, index)),
                           name=index["name"])  # fmt: skip
        recreated.append(index["name"])
    return tuple(recreated)


def _config_options(config_class, index: dict) -> dict:
    details = dict(index["details"])
    accepted = inspect.signature(config_class).parameters
    if "metric_type" in details:
        details["distance_type"] = str(details.pop("metric_type")).lower()
    compression = details.pop("compression", None) or {}
    if compression.get("type") == "pq":
        details.update(num_sub_vectors=compression.get("num_sub_vectors"), num_bits=compression.get("num_bits"))
    return {name: value for name, value in details.items() if name in accepted and value is not None}
