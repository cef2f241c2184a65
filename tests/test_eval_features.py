"""How `embed_images` shares its batches among processes: contiguous shares, each batch once, in order."""

import pytest

from hf_clip_forget.evaluation.features import _shard


@pytest.mark.parametrize(("num_batches", "num_processes"), [(0, 2), (1, 2), (5, 2), (13, 4), (3, 5), (8, 1)])
def test_shares_cover_every_batch_once_in_order_without_padding(num_batches, num_processes):
    batches = list(range(num_batches))
    shares = [_shard(batches, num_processes, index) for index in range(num_processes)]
    assert sum(shares, []) == batches
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
