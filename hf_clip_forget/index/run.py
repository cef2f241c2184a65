"""Edit a whole stored index, streaming: every shard through :func:`~hf_clip_forget.index.shards.edit_shard`, the
rest carried over, and the result published all at once beside the untouched input.

The run, in order: the request is checked before anything is written (the input exists and is a layout this tool
reads, the output is new and outside the input, the input was not itself made by this tool, the edit's dimension
is the vectors'); a hidden staging folder beside the output (``.<name>.hf_clip_forget-index``) records the job
(``job.json``: the edit, the input listing) and one small file per finished shard; carried files are copied; the
provenance file (:data:`~hf_clip_forget.index.shards.PROVENANCE_NAME`) is written last; one rename publishes the
folder. A run killed midway leaves the input as it was and no output; run again, it resumes at the first
unfinished shard. Reverting is pointing back at the input.

Memory: at most ``workers`` shards are in memory at once (read, edited, written), whatever the index's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..files._fs import fsync_path, sync_tree
from .edit import EmbeddingEdit
from .shards import (
    PROVENANCE_NAME,
    IndexLayout,
    IndexLayoutError,
    Shard,
    ShardBuffers,
    ShardResult,
    discover_layout,
    edit_shard,
    shard_dim,
)


JOB_NAME = "job.json"
#: A one-file index's provenance record is this file beside it (``vectors.npy.hf_clip_forget.json``).
SINGLE_FILE_PROVENANCE_SUFFIX = ".hf_clip_forget.json"
DONE_FOLDER = ".done"


@dataclass(frozen=True)
class IndexEditResult:
    """What :func:`edit_index` wrote: the output path, its provenance record, and how long it took."""

    output: str
    provenance: dict
    seconds: float

    @property
    def vectors(self) -> int:
        return self.provenance["vectors"]


#: Runs a per-shard function over shards and returns their results in shard order (the default: threads here;
#: ``hf_clip_forget.index.distributed`` gives one that runs them on a cluster engine).
ShardMapper = Callable[[Callable[[Shard], ShardResult], list[Shard]], Iterable[ShardResult]]


def edit_index(
    edit: EmbeddingEdit,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    column: str | None = None,
    normalized: bool | None = None,
    workers: int = 2,
    mapper: ShardMapper | None = None,
    finish: Callable[[str], dict] | None = None,
    show_progress: bool = True,
) -> IndexEditResult:
    """Write the index at ``source`` with ``edit`` applied to its vectors to the new path ``output``.

    Args:
        edit: the :class:`~hf_clip_forget.index.EmbeddingEdit` (``embedding_edit(model, side)``); its ``side`` chooses
            clip-retrieval's ``img_emb`` or ``text_emb``.
        source: a clip-retrieval output folder, a ``.npy`` file or folder of them, a parquet file or folder, or a
            ``datasets`` dataset saved to disk (then ``column``).
        output: where the edited index is published (must not exist, unless an unfinished run of the same job left
            its staging folder: then it resumes).
        column: the column holding the vectors in table layouts.
        normalized: whether the stored vectors are unit length (default: decided per shard from its rows; all shards
            must agree).
        workers: shards in flight at once in this process (their reading, editing and writing overlap).
        mapper: run the shards elsewhere (a cluster engine); results must come back in shard order.
        finish: called with the staging folder once every shard is edited and the carried files are copied; what it
            writes there is published with the index (beside the output file, for a one-file index), and the entries
            of the dict it returns are added to the provenance (``faiss_index.faiss_rebuilder``: a FAISS index).
    """
    started = time.perf_counter()
    layout = discover_layout(os.fspath(source), edit.side, column)
    target = _check_output(layout, os.fspath(output))
    _refuse_edited_input(layout, edit)
    _check_dimensions(layout, edit)
    staging = _staging_for(target)
    job = _job_record(edit, layout, column, normalized)
    done = _open_staging(staging, job)
    pending = [shard for shard in layout.shards if shard.path not in done]
    buffers = ShardBuffers()  # one shard's bytes in and out per thread, reused; gone with the run

    def run(shard: Shard) -> ShardResult:
        result = edit_shard(edit, layout.root, staging, shard, normalized, buffers)
        _mark_done(staging, result)
        return result

    bar = tqdm(
        total=len(layout.shards), initial=len(done), unit="shard", desc="Editing index", disable=not show_progress
    )
    with bar, _discarded_on_bad_input(staging), _one_thread_each(workers if mapper is None else 1):
        for result in (mapper or _threads(workers))(run, pending):
            done[result.path] = result
            bar.update(1)
        provenance = _provenance(edit, layout, [done[shard.path] for shard in layout.shards], job)
    _copy_carried(layout, staging, edit)
    if finish is not None:
        provenance.update(finish(staging))
    _publish(staging, target, provenance, layout)
    return IndexEditResult(target, provenance, time.perf_counter() - started)


def provenance_path(index: str, single_file: bool) -> str:
    """Where an edited index's provenance record is: inside its folder, or beside a one-file index."""
    return index + SINGLE_FILE_PROVENANCE_SUFFIX if single_file else os.path.join(index, PROVENANCE_NAME)


# ------------------------------------------------------------------------------------------------------ checks
def _check_output(layout: IndexLayout, output: str) -> str:
    target = os.path.abspath(output)
    source = os.path.join(layout.root, layout.shards[0].path) if layout.single_file else layout.root
    if os.path.lexists(target) or (layout.single_file and os.path.lexists(provenance_path(target, True))):
        raise FileExistsError(
            f"{target} exists: the edited index is written to a new path (the input is never modified). Choose a new "
            "--output, or remove that one."
        )
    for inner, outer in ((target, source), (source, target)):
        if os.path.commonpath([inner, outer]) == outer:
            raise ValueError(f"The output {target} and the input {source} must not contain each other: write the "
                             "edited index beside the input.")  # fmt: skip
    if layout.single_file and os.path.splitext(target)[1] != os.path.splitext(source)[1]:
        raise ValueError(f"The input is one file ({os.path.basename(source)}): give an output file with the same "
                         "extension.")  # fmt: skip
    if not os.path.isdir(os.path.dirname(target)):
        raise FileNotFoundError(f"The folder of the output, {os.path.dirname(target)}, does not exist.")
    return target


def _refuse_edited_input(layout: IndexLayout, edit: EmbeddingEdit) -> None:
    """An index this tool wrote records what was applied; editing it again would apply a second edit on top of the
    first (for stacked adapters the union is not the product of their edits), and an index made by another base
    model would be given directions computed elsewhere."""
    path = provenance_path(os.path.join(layout.root, layout.shards[0].path) if layout.single_file else layout.root,
                           layout.single_file)  # fmt: skip
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        record = json.load(handle)
    recorded = record.get("edit", {}).get("base_model_fingerprint")
    if recorded and edit.base_fingerprint and recorded != edit.base_fingerprint:
        raise ValueError(
            f"{layout.root} records that it was made by another base model (fingerprint {recorded[:12]}, this "
            f"model's {edit.base_fingerprint[:12]}): an edit computed on one model removes the wrong directions from "
            "another's vectors. Load the base model that made the index."
        )
    raise ValueError(
        f"{layout.root} is already an edited index (it forgets {record.get('edit', {}).get('forgotten')}); editing "
        f"it again would apply a second edit on top of the first. Edit the original index "
        f"({record.get('input', {}).get('path')}) with every adapter active at once."
    )


def _check_dimensions(layout: IndexLayout, edit: EmbeddingEdit) -> None:
    for shard in layout.shards:
        dim = shard_dim(layout.root, shard)
        if dim not in (0, edit.dim):
            raise ValueError(
                f"{shard.path} holds {dim}-dimensional vectors, but the adapter edits {edit.dim}-dimensional {edit.side} "
                "embeddings: the index was made by another model (or holds the other side). Load the base model that "
                "made it, and check --side."
            )


# ------------------------------------------------------------------------------------------------------ staging
def _staging_for(target: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.hf_clip_forget-index")


def _listing(layout: IndexLayout) -> dict:
    """Every input file with its size and modification time: a resumed run must see the same input."""
    listing = {}
    for relative in [shard.path for shard in layout.shards] + list(layout.carried):
        status = os.stat(os.path.join(layout.root, relative))
        listing[relative] = {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns}
    return listing


def _job_record(edit: EmbeddingEdit, layout: IndexLayout, column, normalized) -> dict:
    return {
        "edit": edit.to_dict(),
        "input": {"path": layout.root, "layout": layout.kind, "column": column, "files": _listing(layout)},
        "normalized": normalized,
    }


def _open_staging(staging: str, job: dict) -> dict[str, ShardResult]:
    """Create the staging folder with its job record, or resume the unfinished run of the same job found there."""
    job_path = os.path.join(staging, JOB_NAME)
    if os.path.isdir(staging):
        try:
            with open(job_path) as handle:
                same = json.load(handle) == job
        except (OSError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"{staging} holds an unfinished run of another job (another adapter, input or setting). Run that job "
                "again to finish it, or remove the folder to start this one."
            )
        return _finished_shards(staging)
    os.makedirs(os.path.join(staging, DONE_FOLDER))
    with open(job_path, "w") as handle:
        json.dump(job, handle, indent=2)
    return {}


def _finished_shards(staging: str) -> dict[str, ShardResult]:
    done = {}
    folder = os.path.join(staging, DONE_FOLDER)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as handle:
                result = ShardResult(**json.load(handle))
            if os.path.isfile(os.path.join(staging, result.path)):
                done[result.path] = result
    return done


def _mark_done(staging: str, result: ShardResult) -> None:
    name = result.path.replace("/", "__") + ".json"
    path = os.path.join(staging, DONE_FOLDER, name)
    with open(path + ".partial", "w") as handle:
        json.dump(result.to_dict(), handle)
    os.replace(path + ".partial", path)


@contextlib.contextmanager
def _discarded_on_bad_input(staging: str):
    """A shard the input cannot give (mixed vectors, a bad column) stops the run and removes its staging folder:
    running again would fail the same way. Any other failure (a kill, a full disk) keeps it, to resume."""
    try:
        yield
    except IndexLayoutError:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _one_thread_each(workers: int):
    """With several shards in flight, each is edited on one torch thread (``workers`` threads in all, not
    ``workers`` × torch's pool fighting over the cores); torch's setting is restored afterwards."""
    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _threads(workers: int) -> ShardMapper:
    def mapper(run, shards):
        if workers <= 1:
            yield from map(run, shards)
            return
        with ThreadPoolExecutor(workers) as pool:
            futures = []
            for shard in shards:  # keep `workers` shards in flight, never the whole index
                futures.append(pool.submit(run, shard))
                if len(futures) >= workers:
                    yield futures.pop(0).result()
            for future in futures:
                yield future.result()

    return mapper


# ------------------------------------------------------------------------------------------------------ publish
def _provenance(edit: EmbeddingEdit, layout: IndexLayout, results: list[ShardResult], job: dict) -> dict:
    flags = {result.normalized for result in results if result.rows}  # an empty shard holds no kind of vectors
    if len(flags) > 1:
        unit = [r.path for r in results if r.normalized][:3]
        raise IndexLayoutError(
            f"Some shards hold unit-length vectors ({unit}...) and others do not, so the index is not one kind of "
            "vectors; pass normalized=True or False (--normalized / --raw) if you know which they are meant to be."
        )
    dims = {result.dim for result in results}
    return {
        "format": 1,
        "tool": f"hf_clip_forget {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edit": edit.to_dict(),
        "input": {**job["input"], "sha256": {r.path: r.input_sha256 for r in results}},
        "output": {"shards": [r.path for r in results], "carried": list(layout.carried)},
        "vectors": sum(r.rows for r in results),
        "dim": dims.pop() if len(dims) == 1 else sorted(dims),
        "normalized": flags.pop() if flags else False,
        "revert": f"Point back at the untouched input, {layout.root}.",
    }


def _copy_carried(layout: IndexLayout, staging: str, edit: EmbeddingEdit) -> None:
    """Copy (never link: the output must not share files with the input) every file that is not a shard; a
    ``datasets`` folder's ``state.json`` gets a new fingerprint (``datasets`` caches by it, and the data changed)."""
    for relative in layout.carried:
        target = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = os.path.join(layout.root, relative)
        if relative == "state.json" and layout.kind == "table":
            with open(source) as handle:
                state = json.load(handle)
            if isinstance(state, dict) and "_fingerprint" in state:
                salt = json.dumps(edit.to_dict(), sort_keys=True) + str(state["_fingerprint"])
                state["_fingerprint"] = hashlib.sha256(salt.encode()).hexdigest()[:16]
                with open(target, "w") as handle:
                    json.dump(state, handle, indent=2)
                continue
        shutil.copyfile(source, target)


def _publish(staging: str, target: str, provenance: dict, layout: IndexLayout) -> None:
    shutil.rmtree(os.path.join(staging, DONE_FOLDER))
    os.remove(os.path.join(staging, JOB_NAME))
    if layout.single_file:  # one file in, one file out (its record beside it)
        shard = os.path.join(staging, layout.shards[0].path)
        fsync_path(shard)
        for name in sorted(set(os.listdir(staging)) - {layout.shards[0].path}):  # what `finish` wrote: beside it
            os.replace(os.path.join(staging, name), os.path.join(os.path.dirname(target), name))
        with open(provenance_path(target, True), "w") as handle:
            json.dump(provenance, handle, indent=2)
        os.replace(shard, target)
        shutil.rmtree(staging)
        fsync_path(os.path.dirname(target))
        return
    with open(os.path.join(staging, PROVENANCE_NAME), "w") as handle:
        json.dump(provenance, handle, indent=2)
    sync_tree(staging, [*layout.carried, PROVENANCE_NAME])  # the shards were flushed as each was written
    os.rename(staging, target)
    fsync_path(os.path.dirname(target))
