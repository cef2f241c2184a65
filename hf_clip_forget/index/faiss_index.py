"""FAISS indexes of edited vectors: rebuilt with the input index's own recipe, never patched (an index stores its
vectors, or codes of them, and structures trained on them). The recipe: its factory string (``reverse_index_factory``,
checked to build an index that gives it back), metric, ``IDMap`` ids, and the settings a factory string does not hold
(IVF ``nprobe``, HNSW ``efSearch`` / ``efConstruction``, a refine's ``k_factor``).

* :func:`faiss_rebuilder` — with the vectors it was built from (``--input VECTORS --faiss-index PATH``): checked
  before anything is written, rebuilt in ``edit_index``'s staging folder, published and recorded with the shards.
* :func:`edit_faiss_index` — the index alone (``--input index.faiss``): only one that stores the vectors themselves
  (``Flat``, ``IVF…,Flat``, ``HNSW…`` with flat storage, an exact refine), read back exactly (``reconstruct_n``); a
  compressed one (PQ, SQ, LSH, PCA / OPQ) is refused, since reconstructing its vectors is lossy.

Guarantee: the rebuilt index holds ``edit.apply`` of the input vectors, as float32, at the same positions (same ids):
a flat index is the one built from ``edit_embeddings``' output; one that needs training (IVF, PQ, SQ, OPQ) is trained
anew on the edited vectors (up to ``train_rows`` of them, evenly spaced) as the original was on the unedited ones, so
it searches like a fresh index of that factory string trained on the same rows (FAISS's k-means is seeded). An HNSW
graph built by several threads is equivalent, not bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .._version import __version__
from ..files._fs import fsync_path
from .edit import EmbeddingEdit
from .run import IndexEditResult, _check_output, _listing, _refuse_edited_input, provenance_path
from .shards import IndexLayout, Shard, _arrow_reader, _table_vectors, discover_layout, shard_dim
from .vector_db import edit_batches


FAISS_SUFFIXES = (".faiss", ".index")
INSTALL_HINT = "pip install 'hf-clip-forget[faiss]'"
#: Rows an index that needs training is trained on, at most (evenly spaced over the index when it holds more).
DEFAULT_TRAIN_ROWS = 1 << 19
SAMPLE_ROWS = 8  #: rows of the first, middle and last shard compared with what the index stores
METRICS = {0: "inner_product", 1: "l2"}
_PARAMETERS = {"IndexIVF": ("nprobe",), "IndexHNSW": ("efSearch", "efConstruction"), "IndexRefine": ("k_factor",)}


class FaissIndexError(ValueError):
    """A FAISS index that cannot be rebuilt from the edited vectors as it was built (the message says why)."""


def import_faiss():
    """``faiss``, or an ``ImportError`` naming the extra that installs it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"Rebuilding a FAISS index needs faiss-cpu: {INSTALL_HINT}.") from error
    return faiss


@dataclass(frozen=True)
class FaissRecipe:
    """How an index was built: factory string, metric, dimension, size, its ids when it maps them (``IDMap``),
    and the settings of each of its parts (``((type, {setting: value}), ...)``, in :func:`_parts` order)."""

    path: str
    factory: str
    metric_type: int
    metric_arg: float
    dim: int
    ntotal: int
    ids: np.ndarray | None = None
    parameters: tuple = ()

    def to_dict(self, **rebuilt) -> dict:
        """The provenance's ``faiss`` section: the recipe, then what ``rebuilt`` adds (file, sha256, training)."""
        ids = "IDMap ids, as in the input index" if self.ids is not None else "positions 0..ntotal-1"
        parameters = [{"part": kind, **values} for kind, values in self.parameters if values]
        metric = METRICS.get(self.metric_type, f"metric {self.metric_type}")
        return {"source": self.path, "factory": self.factory, "metric": metric, "metric_arg": self.metric_arg,
                "d": self.dim, "ntotal": self.ntotal, "ids": ids, "parameters": parameters, **rebuilt}  # fmt: skip


def read_faiss_index(path: str):
    faiss = import_faiss()
    try:
        return faiss.read_index(path)
    except RuntimeError as error:
        reason = str(error).splitlines()[-1]
        raise FaissIndexError(f"{path} is not a FAISS index faiss can read ({reason}): give the file "
                              "`faiss.write_index` wrote (binary indexes are not supported).") from error  # fmt: skip


def recipe_of(index, path: str) -> FaissRecipe:
    """The :class:`FaissRecipe` of ``index``; refused when faiss cannot give a factory string that builds the same
    kind of index."""
    faiss = import_faiss()
    from faiss.contrib.factory_tools import reverse_index_factory

    outer = faiss.downcast_index(index)
    try:
        factory = _reverse_factory(outer, reverse_index_factory)
        probe = faiss.index_factory(index.d, factory, index.metric_type)  # held: faiss frees an index (and its parts)
        again = _reverse_factory(faiss.downcast_index(probe), reverse_index_factory)  # last Python reference
    except (NotImplementedError, RuntimeError, KeyError, AssertionError, AttributeError):
        factory = again = None
    if factory is None or again != factory:
        raise FaissIndexError(f"{path}: faiss cannot give the factory string of this {type(outer).__name__} "
                              "(reverse_index_factory), so it cannot be rebuilt as it was built. Leave --faiss-index "
                              "out and build the index yourself from the edited vectors.")  # fmt: skip
    ids = faiss.vector_to_array(outer.id_map).copy() if isinstance(outer, faiss.IndexIDMap) else None
    parameters = tuple((type(part).__name__, _settings(part)) for part in _parts(index))
    return FaissRecipe(path, factory, int(index.metric_type), float(index.metric_arg), int(index.d),
                       int(index.ntotal), ids, parameters)  # fmt: skip


def _reverse_factory(outer, reverse_index_factory) -> str:
    """``reverse_index_factory``, with the ``IDMap`` / ``IDMap2`` prefix that faiss 1.9's lacks."""
    faiss = import_faiss()
    for kind, prefix in ((faiss.IndexIDMap2, "IDMap2"), (faiss.IndexIDMap, "IDMap")):
        if isinstance(outer, kind):
            return f"{prefix},{reverse_index_factory(outer.index)}"
    return reverse_index_factory(outer)


# ------------------------------------------------------------------------------------------------ with vectors
def faiss_rebuilder(edit: EmbeddingEdit, faiss_index, source, output, *, column: str | None = None,
                    name: str | None = None, train_rows: int = DEFAULT_TRAIN_ROWS,
                    show_progress: bool = True) -> Callable[[str], dict]:  # fmt: skip
    """Check, before anything is written, that the FAISS index at ``faiss_index`` was built from the index at
    ``source`` (:func:`_check_shape`, :func:`_check_built_from`), and return the ``finish`` step of ``edit_index``
    that rebuilds it from the edited shards, as ``name`` inside the output folder (default: its path in the input
    folder, replacing the stale copy, else its file name) or beside a one-file output (``edited.npy`` →
    ``edited.faiss``)."""
    path = os.path.abspath(os.fspath(faiss_index))
    layout = discover_layout(os.fspath(source), edit.side, column)
    index = read_faiss_index(path)
    recipe = recipe_of(index, path)
    rows = [_shard_rows(layout.root, shard) for shard in layout.shards]
    _check_shape(recipe, edit, shard_dim(layout.root, layout.shards[0]), sum(rows), "the input vectors")
    checked = _check_built_from(index, recipe, layout, rows)
    del index  # only the recipe is kept: the rebuilt index is the one in memory
    relative = _output_name(layout, path, os.path.abspath(os.fspath(output)), name)

    def finish(staging: str) -> dict:
        def batches():
            return (_shard_vectors(staging, shard) for shard in layout.shards)

        rebuilt, trained = _rebuild(recipe, batches, train_rows, show_progress)
        _, digest = _write(rebuilt, os.path.join(staging, relative))
        return {"faiss": recipe.to_dict(file=relative, sha256=digest, trained=trained, checked=checked)}

    return finish


def _check_shape(recipe: FaissRecipe, edit: EmbeddingEdit, dim: int, rows: int, what: str) -> None:
    fix = "Give the FAISS index built from these vectors, or leave --faiss-index out."
    if recipe.dim != edit.dim:
        raise FaissIndexError(f"{recipe.path} holds {recipe.dim}-dimensional vectors, but the adapter edits "
                              f"{edit.dim}-dimensional {edit.side} embeddings. {fix}")  # fmt: skip
    if dim not in (0, recipe.dim) or rows != recipe.ntotal:
        raise FaissIndexError(f"{recipe.path} holds {recipe.ntotal} vectors of dimension {recipe.dim}, {what} "
                              f"{rows} of dimension {dim}: it was built from other vectors. {fix}")  # fmt: skip


def _check_built_from(index, recipe: FaissRecipe, layout: IndexLayout, rows: list[int]) -> dict:
    """Compare what the index stores at a few rows of the first, middle and last shard with those input rows: equal
    within the input dtype's rounding (an index of the vectors themselves), or what it would store for them
    (compressed: ``sa_decode(sa_encode(row))``, for at least 3 rows in 4)."""
    faiss = import_faiss()
    part = _positional(index, recipe.path)
    exact = _exact_storage(part) is not None
    codec = faiss.downcast_index(part.storage) if isinstance(part, faiss.IndexHNSW) else part
    offsets, same = np.cumsum([0, *rows]), []
    for k in sorted({0, len(rows) // 2, len(rows) - 1} - {k for k, count in enumerate(rows) if count == 0}):
        local = np.unique(np.linspace(0, rows[k] - 1, min(SAMPLE_ROWS, rows[k])).round().astype(np.int64))
        vectors = _shard_vectors(layout.root, layout.shards[k])
        given = np.ascontiguousarray(vectors[local], dtype=np.float32)
        try:
            stored = np.stack([part.reconstruct(int(offsets[k] + i)) for i in local])
            expected = given if exact else codec.sa_decode(codec.sa_encode(given))
        except RuntimeError as error:
            raise FaissIndexError(f"{recipe.path} cannot read its vectors back ({str(error).splitlines()[-1]}), so "
                                  "that it was built from the input vectors cannot be checked. Leave --faiss-index "
                                  "out and rebuild it yourself from the edited vectors.") from error  # fmt: skip
        tolerance = 4 * max(float(np.finfo(vectors.dtype).eps), 2.5e-4) * np.linalg.norm(given, axis=1)
        same.extend(np.abs(stored - expected).max(axis=1) <= tolerance)
    matched = int(np.sum(same))
    if (matched < len(same)) if exact else (matched * 4 < len(same) * 3):
        raise FaissIndexError(f"{recipe.path} was not built from the input vectors (in this order): "
                              f"{len(same) - matched} of {len(same)} sampled rows differ from what it stores. Give "
                              "the FAISS index built from them, or leave --faiss-index out.")  # fmt: skip
    return {"rows": len(same), "matched": matched, "how": "stored vectors" if exact else "codes (sa_encode)"}


def _output_name(layout: IndexLayout, path: str, output: str, name: str | None) -> str:
    """Where the rebuilt index goes, relative to the staging folder; refused when it would replace a file."""
    if layout.single_file:
        name = name or os.path.splitext(os.path.basename(output))[0] + os.path.splitext(path)[1]
        final = os.path.join(os.path.dirname(output), name)
        if os.path.dirname(name) or os.path.lexists(final) or final == output:
            raise FileExistsError(f"The rebuilt FAISS index would be written to {final}, which exists (or is not a "
                                  "plain file name): choose a new --faiss-output name.")  # fmt: skip
        return name
    inside = os.path.commonpath([path, layout.root]) == layout.root
    name = (name or (os.path.relpath(path, layout.root) if inside else os.path.basename(path))).replace(os.sep, "/")
    stale = inside and name == os.path.relpath(path, layout.root).replace(os.sep, "/")
    taken = {shard.path for shard in layout.shards} | (set() if stale else set(layout.carried))
    if os.path.isabs(name) or ".." in name.split("/") or name in taken:
        raise FileExistsError(f"--faiss-output {name!r} must be a new path inside the output folder (not a shard "
                              "or a carried file).")  # fmt: skip
    return name


# ------------------------------------------------------------------------------------------------ index alone
def edit_faiss_index(edit: EmbeddingEdit, source, output, *, normalized: bool | None = None,
                     train_rows: int = DEFAULT_TRAIN_ROWS, batch_size: int = 65536,
                     show_progress: bool = True) -> IndexEditResult:  # fmt: skip
    """Write the FAISS index at ``source`` rebuilt from its own vectors, edited, to the new file ``output`` (a
    provenance record beside it, ``<output>.hf_clip_forget.json``). Only an index that stores its vectors exactly
    is accepted (see the module docstring); memory: the input index, the rebuilt one and ``batch_size`` rows."""
    started = time.perf_counter()
    source, target = os.path.abspath(os.fspath(source)), os.fspath(output)
    layout = IndexLayout(os.path.dirname(source), "faiss", (Shard(os.path.basename(source), "faiss"),),
                         single_file=True)  # fmt: skip
    target = _check_output(layout, target)  # new, outside the input, same suffix, its folder exists
    _refuse_edited_input(layout, edit)
    index = read_faiss_index(source)
    recipe = recipe_of(index, source)
    _check_shape(recipe, edit, recipe.dim, recipe.ntotal, "it reads back")
    storage = _exact_storage(_positional(index, source))
    if storage is None:
        raise FaissIndexError(f"{source} ({recipe.factory}) stores its vectors compressed, and reconstructing them "
                              "is lossy: give the embeddings the index was built from (--input <vectors> "
                              f"--faiss-index {source}); the index rebuilt from them holds exactly the edited "
                              "vectors.")  # fmt: skip
    decided = []

    def batches():
        starts = range(0, recipe.ntotal, batch_size)
        stored = (storage.reconstruct_n(start, min(batch_size, recipe.ntotal - start)) for start in starts)
        for edited, unit in edit_batches(edit, stored, normalized):
            decided.append(unit)
            yield edited

    rebuilt, trained = _rebuild(recipe, batches, train_rows, show_progress)
    partial, digest = _write(rebuilt, target, publish=False)
    record = _alone_provenance(edit, recipe, layout, target, digest, trained, bool(decided and decided[-1]))
    with open(provenance_path(target, True), "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(partial, target)
    fsync_path(os.path.dirname(target))
    return IndexEditResult(target, record, time.perf_counter() - started)


def _alone_provenance(edit, recipe, layout: IndexLayout, target, digest, trained, normalized) -> dict:
    """The record of ``edit_index`` for one file in, one file out: the input file, its digest, the rebuilt index."""
    name, output = layout.shards[0].path, os.path.basename(target)
    checked = {"how": "vectors read back exactly (reconstruct_n)"}
    return {
        "format": 1, "tool": f"hf_clip_forget {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edit": edit.to_dict(),
        "input": {"path": layout.root, "layout": "faiss", "column": None, "files": _listing(layout),
                  "sha256": {name: _sha256(os.path.join(layout.root, name))}},
        "output": {"file": output}, "vectors": recipe.ntotal, "dim": recipe.dim, "normalized": normalized,
        "faiss": recipe.to_dict(file=output, sha256=digest, trained=trained, checked=checked),
        "revert": f"Point back at the untouched input, {os.path.join(layout.root, name)}.",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ rebuilding
def _rebuild(recipe: FaissRecipe, batches: Callable[[], Iterable[np.ndarray]], train_rows: int, show: bool):
    """A new index of ``recipe``, trained (if it needs it) on the edited rows, then given every edited row in order;
    returns it and what it was trained on (``None``: no training)."""
    from tqdm.auto import tqdm

    faiss = import_faiss()
    index = faiss.index_factory(recipe.dim, recipe.factory, recipe.metric_type)
    index.metric_arg = recipe.metric_arg
    for part, (kind, values) in zip(_parts(index), recipe.parameters, strict=False):
        if type(part).__name__ == kind:
            for name, value in values.items():
                setattr(part.hnsw if name.startswith("ef") else part, name, value)
    trained = None
    if not index.is_trained:
        sample = _training_rows(batches(), recipe.ntotal, train_rows)
        index.train(sample)
        trained = {"rows": len(sample), "of": recipe.ntotal, "how": "anew, on the edited vectors"}
    start = 0
    with tqdm(total=recipe.ntotal, unit="vector", desc="Rebuilding FAISS index", disable=not show) as bar:
        for batch in batches():
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if recipe.ids is None:
                index.add(batch)
            else:  # the ids, in the order the input index holds them
                index.add_with_ids(batch, recipe.ids[start : start + len(batch)])
            start += len(batch)
            bar.update(len(batch))
    if index.ntotal != recipe.ntotal:
        raise FaissIndexError(f"Rebuilt {index.ntotal} vectors, expected {recipe.ntotal}: nothing was published.")
    return index, trained


def _training_rows(batches: Iterable[np.ndarray], total: int, limit: int) -> np.ndarray:
    wanted = np.zeros(total, dtype=bool)  # every row up to `limit` rows, else `limit` evenly spaced ones
    wanted[np.linspace(0, total - 1, min(total, limit)).round().astype(np.int64)] = True
    parts, start = [], 0
    for batch in batches:
        parts.append(np.asarray(batch[wanted[start : start + len(batch)]], dtype=np.float32))
        start += len(batch)
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


def _write(index, path: str, publish: bool = True) -> tuple[str, str]:
    """Write ``index`` durably as ``path + ".partial"``, renamed ``path`` if ``publish``; returns its name, sha256."""
    partial = path + ".partial"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import_faiss().write_index(index, partial)
    fsync_path(partial)
    digest = _sha256(partial)
    if publish:
        os.replace(partial, path)
    return (path if publish else partial), digest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _parts(index):
    """The index and the indexes inside it (an IDMap's or a transform's ``index``, a refine's ``base_index``, an
    IVF's ``quantizer``), depth first: the same sequence for two indexes of one factory string."""
    faiss = import_faiss()
    part = faiss.downcast_index(index)
    yield part
    for attribute in ("index", "base_index", "quantizer"):
        child = getattr(part, attribute, None)
        if isinstance(child, faiss.Index):
            yield from _parts(child)


def _settings(part) -> dict:
    """The settings of one part that its factory string does not hold (:data:`_PARAMETERS`)."""
    faiss = import_faiss()
    kinds = [(kind, names) for kind, names in _PARAMETERS.items() if isinstance(part, getattr(faiss, kind))]
    return {name: getattr(part.hnsw if kind == "IndexHNSW" else part, name) for kind, names in kinds for name in names}


def _positional(index, path: str):
    """The part whose ``reconstruct(i)`` is the ``i``-th vector added: an IDMap's inner index; an IVF index with its
    direct map (refused when its lists hold ids it was given rather than positions)."""
    faiss = import_faiss()
    part = faiss.downcast_index(index)
    if isinstance(part, faiss.IndexIDMap):
        part = faiss.downcast_index(part.index)
    ivf = faiss.try_extract_index_ivf(part)
    if ivf is not None:
        try:
            ivf.make_direct_map()
        except RuntimeError as error:
            raise FaissIndexError(f"{path}: its inverted lists hold ids given with add_with_ids, not positions, so "
                                  "which input row each stored vector is cannot be told. Rebuild it yourself from the "
                                  "edited vectors with your ids.") from error  # fmt: skip
    return part


def _exact_storage(part):
    """The part holding the vectors themselves (float32, read back exactly), or ``None`` for compressed storage."""
    faiss = import_faiss()
    part = faiss.downcast_index(part)
    if isinstance(part, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return part
    inner = {faiss.IndexHNSW: "storage", faiss.IndexRefine: "refine_index"}
    found = [getattr(part, attribute) for kind, attribute in inner.items() if isinstance(part, kind)]
    return _exact_storage(found[0]) if found else None


# ------------------------------------------------------------------------------------------------ shards
def _shard_vectors(root: str, shard: Shard) -> np.ndarray:
    path = os.path.join(root, shard.path)
    if shard.format == "npy":
        return np.load(path, mmap_mode="r")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = shard.format == "parquet"
    table = pq.read_table(path, columns=[shard.column]) if parquet else _arrow_reader(pa.memory_map(path)).read_all()
    return _table_vectors(table, shard)[1]


def _shard_rows(root: str, shard: Shard) -> int:
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(os.path.join(root, shard.path)).metadata.num_rows)
    return len(_shard_vectors(root, shard))  # memory-mapped: nothing is read but the header
