"""``edit_index`` on a Ray cluster of several nodes, reached by address as ``edit-index --engine ray --engine-address``
reaches one: a head node with no CPUs (it only schedules) and two worker nodes, each its own raylet and object store,
started on this machine by Ray's own multi-node test harness (``ray.cluster_utils.Cluster``). The shards run on both
worker nodes, none on the head, and the output is the single-process run's bytes."""

import time

import pytest

from hf_clip_forget.index import Shard, embedding_edit
from hf_clip_forget.index.distributed import ray_mapper
from hf_clip_forget.index.run import edit_index

from .test_index_distributed import same_output
from .test_index_run import clip_retrieval_index, digests, model  # noqa: F401 (`model`: a fixture)


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local instance: this one connects by address
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
    nodes.wait_for_nodes()
    yield nodes, {worker.node_id for worker in workers}
    nodes.shutdown()


def test_the_shards_run_on_both_worker_nodes_and_write_the_single_process_bytes(model, cluster, tmp_path):  # noqa: F811
    nodes, worker_ids = cluster

    def where(shard):
        import ray

        time.sleep(0.5)  # long enough that both nodes' single CPUs are taken at once
        return ray.get_runtime_context().get_node_id()

    ran_on = set(ray_mapper(address=nodes.address)(where, [Shard(f"s{i}.npy", "npy") for i in range(4)]))
    assert ran_on == worker_ids  # both worker nodes, never the head (it has no CPU)
    assert not ray.is_initialized()  # the mapper connected for the run and disconnected after

    source = clip_retrieval_index(tmp_path / "index", shards=4, rows=60)
    before = digests(source)
    edit = embedding_edit(model)
    on_cluster = edit_index(edit, source, tmp_path / "cluster", mapper=ray_mapper(address=nodes.address),
                            show_progress=False)  # fmt: skip
    here = edit_index(edit, source, tmp_path / "local", workers=1, show_progress=False)
    assert digests(source) == before
    same_output(on_cluster, here, tmp_path / "cluster", tmp_path / "local")
