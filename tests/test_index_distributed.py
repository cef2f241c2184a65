"""``edit_index`` on Ray (local mode, 2 workers): the same per-shard function in Ray tasks writes the same bytes as the
single-process run, for a clip-retrieval index of float16 shards and for a parquet table; a failing shard stops
the run with an error naming it."""

import json
import os
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_clip_forget.index import IndexLayoutError, Shard, embedding_edit
from hf_clip_forget.index.distributed import ShardFailedError, ray_mapper
from hf_clip_forget.index.run import edit_index

from .test_index_run import DIM, clip_retrieval_index, digests, model, vectors  # noqa: F401 (`model`: a fixture)


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_workers():
    """One local Ray instance with 2 CPUs for the module (``ray_mapper`` uses a connection it finds)."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray_mapper()
    ray.shutdown()


def table_index(root, shards=3, rows=40) -> str:
    root.mkdir()
    for i in range(shards):
        embedding = pa.array(list(vectors(rows, 200 + i, np.float32)), type=pa.list_(pa.float32(), DIM))
        table = pa.table({"id": list(range(rows)), "embedding": embedding})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=16)
    (root / "README.txt").write_text("carried over\n")
    return str(root)


def same_output(ray_run, local_run, ray_output, local_output) -> None:
    """Every file byte-identical, and the provenance records equal but for their creation time."""
    on_ray, here = digests(ray_output), digests(local_output)
    assert on_ray.pop("hf_clip_forget_index.json") and here.pop("hf_clip_forget_index.json")
    assert on_ray == here
    for record in (ray_run.provenance, local_run.provenance):
        record.pop("created")
    assert ray_run.provenance == local_run.provenance
    written = json.loads((ray_output / "hf_clip_forget_index.json").read_text())
    assert {k: v for k, v in written.items() if k != "created"} == ray_run.provenance


@pytest.mark.parametrize("layout", ["clip-retrieval", "table"])
def test_ray_writes_the_same_bytes_as_the_single_process_run(model, two_workers, tmp_path, layout):  # noqa: F811
    if layout == "clip-retrieval":
        source, column = clip_retrieval_index(tmp_path / "index", shards=4, rows=60), None
    else:
        source, column = table_index(tmp_path / "index"), "embedding"
    edit = embedding_edit(model)
    before = digests(source)
    on_ray = edit_index(edit, source, tmp_path / "ray", column=column, mapper=two_workers, show_progress=False)
    here = edit_index(edit, source, tmp_path / "local", column=column, workers=1, show_progress=False)
    assert digests(source) == before  # the input is untouched
    assert on_ray.vectors == (240 if layout == "clip-retrieval" else 120)
    same_output(on_ray, here, tmp_path / "ray", tmp_path / "local")
    assert sorted(os.listdir(tmp_path)) == ["index", "local", "ray"]  # no staging folder left


def test_results_come_back_in_shard_order_from_several_workers(two_workers):
    shards = [Shard(f"s{i}.npy", "npy") for i in range(6)]

    def run(shard):
        import os
        import time

        time.sleep(0.3 if shard.path == "s0.npy" else 0.0)  # the first shard finishes last
        return shard.path, os.getpid()

    results = list(two_workers(run, shards))
    assert [path for path, _ in results] == [shard.path for shard in shards]
    assert len({pid for _, pid in results}) >= 2  # both workers took shards


def test_num_workers_caps_the_shards_edited_at_once(two_workers):
    def run(shard):
        import time

        started = time.monotonic()
        time.sleep(0.1)
        return started, time.monotonic()

    spans = sorted(ray_mapper(num_workers=1)(run, [Shard(f"s{i}.npy", "npy") for i in range(4)]))
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))  # one at a time (one clock)


def test_a_failing_shard_is_named_and_keeps_the_kind_of_its_error(two_workers):
    shards = [Shard(f"s{i}.npy", "npy") for i in range(4)]

    def failing(kind):
        def run(shard):
            if shard.path == "s2.npy":
                raise kind("cannot read it")
            return shard.path

        return run

    with pytest.raises(ShardFailedError, match=r"Shard s2.npy failed on a Ray worker \(OSError: cannot read it\)"):
        list(two_workers(failing(OSError), shards))
    with pytest.raises(IndexLayoutError, match=r"Shard s2.npy \(on a Ray worker\): cannot read it"):
        list(two_workers(failing(IndexLayoutError), shards))


def test_a_bad_shard_on_ray_leaves_no_output_and_no_staging(model, two_workers, tmp_path):  # noqa: F811
    source = table_index(tmp_path / "index")
    holed = [list(v) for v in vectors(4, 9, np.float32)]
    holed[2] = None  # its first vector passes the checks made before the run; the worker finds the missing one
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "embedding": pa.array(holed, type=pa.list_(pa.float32()))}),
                   tmp_path / "index" / "part-1.parquet")  # fmt: skip
    with pytest.raises(IndexLayoutError, match=r"Shard part-1.parquet \(on a Ray worker\): .*1 missing vectors"):
        edit_index(embedding_edit(model), source, tmp_path / "ray", column="embedding", mapper=two_workers,
                   show_progress=False)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_a_missing_engine_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"hf-clip-forget\[ray\]"):
        ray_mapper()
