"""Run :func:`~hf_clip_forget.index.run.edit_index` on a Ray cluster: the same per-shard function, one Ray task per
shard, instead of the local thread pool.

What runs where:

* the **driver** (the process calling ``edit_index``, e.g. ``hf-clip-forget edit-index --engine ray``) lists the
  shards, checks the request, creates the staging folder, submits the tasks, receives their small
  :class:`~hf_clip_forget.index.shards.ShardResult` records in shard order (the progress bar), then copies the carried
  files, writes the provenance record and publishes the output;
* each **worker** task reads one shard, applies the edit (the :class:`~hf_clip_forget.index.EmbeddingEdit` travels
  once through Ray's object store, a few small float32 factors), writes the edited shard into the staging folder
  (temporary name, then rename) and marks it done there: :func:`~hf_clip_forget.index.shards.edit_shard`, the
  function the single-process run calls, so the output is the same bytes.

The vectors never pass through the driver or the object store: every worker must see the input and the output's
folder at the **same paths** as the driver, on a shared filesystem that can rename files and folders (NFS, Lustre,
CephFS; an object store only through a mount that renames: ``docs/index_cluster.md``), and have ``hf_clip_forget``
installed. On one machine (a local Ray instance) that holds by construction. A failed shard stops the run with
:class:`ShardFailedError` naming it; the finished shards stay in the staging folder, and running the same edit again
resumes after them.
"""

from __future__ import annotations

from collections import deque

from .run import ShardMapper
from .shards import IndexLayoutError


INSTALL_HINT = "pip install 'hf-clip-forget[ray]'"


class ShardFailedError(RuntimeError):
    """A shard could not be edited on a worker (its task raised, its worker or node died)."""


def ray_mapper(address: str | None = None, num_workers: int | None = None, **task_options) -> ShardMapper:
    """A ``mapper`` for :func:`~hf_clip_forget.index.run.edit_index` that edits every shard in its own Ray task.

    Args:
        address: the Ray cluster to connect to (``"auto"``, ``"<head-ip>:6379"``, ``"ray://<head-ip>:10001"``);
            ``None`` starts a local Ray instance on this machine for the run (and stops it after) unless this
            process is already connected to one (``ray.init`` was called), which is then used as it is.
        num_workers: shards edited at once, at most (each task holds one shard in memory); default: one per CPU
            of the cluster. A local instance started here gets this many CPUs.
        task_options: passed to Ray's ``.options()`` for every task, e.g. ``num_cpus=2`` or ``memory=4 * 2**30`` to
            reserve a shard's memory per task.

    Raises:
        ImportError: Ray is not installed (the message names the extra).
    """
    ray = _import_ray()
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}.")

    def mapper(run, shards):
        started = not ray.is_initialized()
        if started:  # a local instance gets `num_workers` CPUs and no dashboard; a cluster is used as it is
            local = {"num_cpus": num_workers, "include_dashboard": False} if address is None else {}
            try:
                ray.init(address=address, **local)
            except ConnectionError as error:
                raise ConnectionError(f"No Ray cluster at {address!r} (the engine address): {error}") from error
        try:
            yield from _ordered(ray, run, shards, num_workers or _cluster_cpus(ray), task_options)
        finally:
            if started:
                ray.shutdown()

    return mapper


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            f"Editing an index on Ray needs Ray: {INSTALL_HINT} (or `pip install 'ray>=2.31'`)."
        ) from error
    return ray


def _cluster_cpus(ray) -> int:
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def _ordered(ray, run, shards, parallelism: int, task_options: dict):
    """Keep ``parallelism`` tasks running (a new one starts as soon as any finishes), at most ``4 × parallelism``
    shards ahead of the oldest one not yet given back, and yield their results in shard order. On a failure or when
    the caller stops early, the tasks not yet finished are cancelled."""
    remote = ray.remote(_run_one)
    if task_options:
        remote = remote.options(**task_options)
    run_ref = ray.put(run)  # the edit and the layout are shipped once, not once per task
    waiting = iter(shards)
    submitted: deque = deque()  # (shard, ref) in shard order, not yet yielded
    running: set = set()
    try:
        while True:
            while len(running) < parallelism and len(submitted) < 4 * parallelism:
                if (shard := next(waiting, None)) is None:
                    break
                submitted.append((shard, remote.remote(run_ref, shard)))
                running.add(submitted[-1][1])
            if not submitted:
                return
            if submitted[0][1] in running:  # wait for any task, so that a finished one's slot is used at once
                ready, _ = ray.wait(list(running), num_returns=1)
                running.difference_update(ready)
                continue
            shard, ref = submitted.popleft()
            yield _result(ray, shard, ref)
    finally:
        _cancel(ray, list(running))


def _cancel(ray, refs: list, timeout: float = 60.0) -> None:
    """Cancel unfinished tasks and wait (a bounded time) until they stopped, so that none writes into the staging
    folder after the run decided what to do with it."""
    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)


def _run_one(run, shard):
    return run(shard)


def _result(ray, shard, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:  # the shard's own code raised: keep the kind of error
        cause = error.cause if isinstance(error.cause, Exception) else error
        if isinstance(cause, IndexLayoutError):  # the input cannot give this shard: the run discards its staging
            raise IndexLayoutError(f"Shard {shard.path} (on a Ray worker): {cause}") from error
        raise ShardFailedError(_failure(shard, f"{type(cause).__name__}: {cause}")) from error
    except ray.exceptions.RayError as error:  # a worker or node died, the object was lost, the task was cancelled
        raise ShardFailedError(_failure(shard, f"{type(error).__name__}: {error}")) from error


def _failure(shard, what: str) -> str:
    return (
        f"Shard {shard.path} failed on a Ray worker ({what}). The shards finished before it are kept: run the same "
        "edit again to resume after them."
    )
