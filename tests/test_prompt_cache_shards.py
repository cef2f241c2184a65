"""The prompt cache's storage (issue 24): a miss is stored as a new shard (the rows already on disk are not rewritten,
except into a merged shard at least twice their size), a key's shards are read together, a corrupt shard is ignored
alone, and the rows come back as one gather from one in-memory tensor."""

import os
import warnings

import huggingface_hub.constants
import pytest
import torch

from hf_clip_forget.cli import main
from hf_clip_forget.core import encode_prompts, prompt_cache, prompt_store
from hf_clip_forget.core.prompt_cache import PROMPT_CACHE_ENV, cached_embeddings, clear_prompt_cache, prompt_cache_info
from hf_clip_forget.core.prompt_store import RowTable
from hf_clip_forget.testing_utils import tiny_model

from .test_prompt_cache import entries, text_rows


PARTS = {"text_path": "test", "tokenizer": "test", "device": "cpu"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh HF_HOME and an empty memory cache: the test sees only its own shards."""
    home = tmp_path / "home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})
    monkeypatch.delenv(PROMPT_CACHE_ENV, raising=False)
    return home / "hf_clip_forget" / "prompts"


def rows_of(prompts) -> torch.Tensor:
    """What the synthetic encoder computes for ``prompts``: a row determined by the prompt alone."""
    return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(hash(p) % 2**31)) for p in prompts])


class Encoder:
    """A ``compute`` for :func:`cached_embeddings` that records the prompts it is asked for."""

    def __init__(self):
        self.asked = []

    def __call__(self, prompts):
        self.asked.append(list(prompts))
        return rows_of(prompts)


def forget_memory(monkeypatch):
    """A new process: nothing in memory, everything read from disk."""
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})


def states(folder) -> dict[str, tuple]:
    return {name: (os.stat(folder / name).st_mtime_ns, (folder / name).read_bytes()) for name in entries(folder)}


def test_misses_in_several_calls_add_shards_and_leave_the_older_ones_untouched(cache_dir, monkeypatch, capsys):
    first, second, third = (
        [f"prompt {i}" for i in range(start, stop)] for start, stop in ((0, 40), (40, 50), (50, 52))
    )
    encoder = Encoder()
    cached_embeddings(PARTS, first, encoder)
    (shard,) = entries(cache_dir)
    written = states(cache_dir)
    cached_embeddings(PARTS, first + second, encoder)
    assert len(entries(cache_dir)) == 2 and states(cache_dir)[shard] == written[shard]  # not rewritten
    written = states(cache_dir)
    cached_embeddings(PARTS, third + first, encoder)
    assert len(entries(cache_dir)) == 3 and all(states(cache_dir)[name] == state for name, state in written.items())
    assert encoder.asked == [first, second, third]  # each prompt computed once
    forget_memory(monkeypatch)
    everything = [*third, *second, *first, "prompt 3"]
    found = cached_embeddings(PARTS, everything, Encoder())  # read from the three shards, no compute
    assert torch.equal(found, rows_of(everything))
    (entry,) = prompt_cache_info()
    assert (entry.prompts, entry.dim, entry.shards) == (52, 8, 3)
    assert entry.size == sum(os.path.getsize(cache_dir / name) for name in entries(cache_dir))
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "1 entry, 52 prompts, " in out and "52 prompts × 8 in 3 shards" in out


def test_small_shards_are_merged_so_a_key_keeps_few_shards(cache_dir, monkeypatch):
    encoder, prompts = Encoder(), []
    for call in range(64):  # 64 misses of 5 prompts each
        prompts += [f"call {call} prompt {i}" for i in range(5)]
        cached_embeddings(PARTS, prompts, encoder)
    assert len(encoder.asked) == 64 and all(len(asked) == 5 for asked in encoder.asked)
    shards = entries(cache_dir)
    assert len(shards) <= 9  # log2(320 rows) + 1
    forget_memory(monkeypatch)
    assert torch.equal(cached_embeddings(PARTS, prompts, Encoder()), rows_of(prompts))
    assert prompt_cache_info()[0].prompts == 320  # no row stored twice


def test_a_corrupt_shard_is_ignored_alone_and_its_rows_recomputed(cache_dir, monkeypatch):
    first, second = [f"prompt {i}" for i in range(40)], [f"prompt {i}" for i in range(40, 45)]
    cached_embeddings(PARTS, first, Encoder())
    cached_embeddings(PARTS, first + second, Encoder())
    large = prompt_store.shard_name(prompt_cache.cache_key(PARTS), 0)  # the first miss's 40 rows
    (small,) = [name for name in entries(cache_dir) if name != large]
    large_state = states(cache_dir)[large]
    (cache_dir / small).write_bytes(b"not safetensors")
    forget_memory(monkeypatch)
    encoder = Encoder()
    with pytest.warns(UserWarning, match=f"Ignoring the cached prompt embeddings .*{small}"):
        found = cached_embeddings(PARTS, first + second, encoder)
    assert encoder.asked == [second] and torch.equal(found, rows_of(first + second))  # only the corrupt shard's rows
    assert states(cache_dir)[large] == large_state and len(entries(cache_dir)) == 2  # replaced, the other untouched
    forget_memory(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = Encoder()
        assert torch.equal(cached_embeddings(PARTS, first + second, encoder), rows_of(first + second))
    assert encoder.asked == []


def test_a_corrupt_shard_whose_rows_another_holds_is_deleted_at_the_next_read(cache_dir, monkeypatch):
    prompts = [f"prompt {i}" for i in range(10)]
    cached_embeddings(PARTS, prompts, Encoder())
    key = prompt_cache.cache_key(PARTS)
    (cache_dir / prompt_store.shard_name(key, 7)).write_bytes(b"\0" * 10)  # e.g. left by a crash or a bad copy
    forget_memory(monkeypatch)
    with pytest.warns(UserWarning, match="Ignoring the cached prompt embeddings"):
        assert torch.equal(cached_embeddings(PARTS, prompts, Encoder()), rows_of(prompts))
    assert entries(cache_dir) == [prompt_store.shard_name(key, 0)]


def test_cache_rows_equal_a_fresh_encoding_across_shards(cache_dir, tokenizer, monkeypatch):
    model = tiny_model("CLIPModel")
    prompts = [f"a photo of a {name}." for name in ("cat", "dog", "car", "bird", "horse", "ship", "truck", "frog")]
    for stop in (6, 7, 8):  # three misses: a shard of 6 prompts, then two of one (the second merged with the first)
        encode_prompts(model, tokenizer, prompts[:stop], show_progress=False)
    assert len(entries(cache_dir)) == 2
    fresh = encode_prompts(model, tokenizer, prompts, show_progress=False, use_cache=False)
    forget_memory(monkeypatch)
    with text_rows(model) as seen:
        cached = encode_prompts(model, tokenizer, prompts[::-1] + prompts, show_progress=False)
    assert seen == []  # every prompt came from the shards
    assert ((cached - torch.cat([fresh.flip(0), fresh])).norm(dim=1) / fresh.norm(dim=1).repeat(2)).max() <= 1e-5


def test_clearing_deletes_every_shard_and_counts_keys(cache_dir):
    cached_embeddings(PARTS, ["a", "b", "c", "d", "e", "f"], Encoder())
    cached_embeddings(PARTS, ["g"], Encoder())
    cached_embeddings({**PARTS, "device": "cuda"}, ["a"], Encoder())
    assert len(entries(cache_dir)) == 3 and len(prompt_cache_info()) == 2
    assert clear_prompt_cache() == 2
    assert os.listdir(cache_dir) == []


def test_20000_cached_prompts_come_back_as_one_gather_in_any_order(cache_dir):
    prompts = [f"prompt {i}" for i in range(20_000)]
    cached_embeddings(PARTS, prompts, Encoder())
    order = torch.randperm(20_000, generator=torch.Generator().manual_seed(0)).tolist()
    subset = [prompts[i] for i in order[:5_000]] * 2
    encoder = Encoder()
    found = cached_embeddings(PARTS, subset, encoder)
    assert encoder.asked == [] and torch.equal(found, rows_of(subset))


def test_a_row_table_grows_keeps_first_rows_and_returns_new_tensors():
    table = RowTable()
    table.add(["a", "b", "a"], torch.tensor([[1.0, 0], [2, 0], [9, 9]]))  # a repeated prompt keeps its first row
    for i in range(100):  # grows past its capacity many times
        table.add([f"p{i}", "b"], torch.tensor([[float(i), 1], [7, 7]]))
    assert len(table) == 102 and table.missing(["a", "zz", "p5", "zz"]) == ["zz"]
    gathered = table.gather(["p99", "a", "b", "p0"])
    assert torch.equal(gathered, torch.tensor([[99.0, 1], [1, 0], [2, 0], [0, 1]]))
    gathered.zero_()
    assert torch.equal(table.gather(["a"]), torch.tensor([[1.0, 0]]))  # the caller's copy, not the table
    with pytest.raises(KeyError):
        table.gather(["zz"])
    assert RowTable(torch.float64).gather([]).dtype == torch.float64
