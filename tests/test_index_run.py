"""``edit_index`` / ``hf-clip-forget edit-index``: every layout users have (clip-retrieval, .npy, parquet, a saved
``datasets`` dataset) is written edited beside the untouched input, with only the vectors changed, a provenance
record that matches the files, resumption after an interruption, and refusals before anything is written."""

import hashlib
import json
import os
import warnings

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_clip_forget.index import edit_embeddings, embedding_edit
from hf_clip_forget.index.run import edit_index
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer


DIM = 16  # the tiny CLIP's embedding dimension


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_clip().add_forget_adapter(["truck", "tree"], tokenizer=tiny_tokenizer(), show_progress=False)


def vectors(rows: int, seed: int, dtype=np.float16, normalized=True) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, DIM))
    if normalized:
        values /= np.linalg.norm(values, axis=1, keepdims=True)
    return values.astype(dtype)


def clip_retrieval_index(root, shards=3, rows=50) -> str:
    for folder in ("img_emb", "text_emb", "metadata"):
        os.makedirs(root / folder)
    for i in range(shards):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", vectors(rows, i))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", vectors(rows, 100 + i))
        pq.write_table(pa.table({"url": [f"https://x/{i}/{j}.jpg" for j in range(rows)]}),
                       root / "metadata" / f"metadata_{i}.parquet")  # fmt: skip
    return str(root)


def digests(root) -> dict[str, str]:
    found = {}
    for current, _, names in os.walk(root):
        for name in names:
            path = os.path.join(current, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def test_a_clip_retrieval_index_is_edited_shard_by_shard_and_the_rest_carried_over(model, tmp_path):
    source = clip_retrieval_index(tmp_path / "index")
    before = digests(source)
    result = edit_index(embedding_edit(model), source, tmp_path / "edited", show_progress=False)
    assert digests(source) == before  # the input is untouched
    after = digests(tmp_path / "edited")
    for relative, digest in before.items():
        if relative.startswith("img_emb"):
            stored = np.load(os.path.join(source, relative))
            edited = np.load(tmp_path / "edited" / relative)
            assert edited.dtype == np.float16 and edited.shape == stored.shape
            assert np.array_equal(edited, edit_embeddings(model, stored))
            assert digest != after[relative]
        else:
            assert after[relative] == digest  # metadata and the text side, byte for byte
    record = json.loads((tmp_path / "edited" / "hf_clip_forget_index.json").read_text())
    assert record["vectors"] == 150 and record["normalized"] is True and record["input"]["layout"] == "clip-retrieval"
    assert record["input"]["sha256"] == {k: v for k, v in before.items() if k.startswith("img_emb")}
    assert record["output"]["shards"] == [f"img_emb/img_emb_{i}.npy" for i in range(3)]
    assert record["edit"]["forgotten"] == {"default": ["truck", "tree"]}
    assert result.provenance == record
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left


def test_tables_keep_their_other_columns_schema_and_list_type(model, tmp_path):
    stored = vectors(40, 7, np.float32, normalized=False)
    for list_type in (pa.list_(pa.float32(), DIM), pa.list_(pa.float32())):
        folder = tmp_path / str(list_type).replace(" ", "").replace("<", "").replace(">", "").replace(":", "")
        folder.mkdir()
        table = pa.table({"id": list(range(40)), "embedding": pa.array(list(stored), type=list_type)})
        pq.write_table(table, folder / "part-0.parquet", row_group_size=16)
        edit_index(embedding_edit(model), folder, str(folder) + "-edited", column="embedding", show_progress=False)
        edited = pq.read_table(str(folder) + "-edited/part-0.parquet")
        assert edited.schema == table.schema and edited.column("id") == table.column("id")
        values = np.stack(edited.column("embedding").to_numpy(zero_copy_only=False))
        assert np.array_equal(values, edit_embeddings(model, stored))


def test_a_saved_datasets_dataset_loads_back_edited_with_a_new_fingerprint(model, tmp_path):
    stored = vectors(30, 3, np.float32)
    dataset = datasets.Dataset.from_dict({"caption": [f"c{i}" for i in range(30)], "embedding": stored.tolist()})
    dataset.save_to_disk(str(tmp_path / "ds"))
    edit_index(embedding_edit(model), tmp_path / "ds", tmp_path / "ds-edited", column="embedding", show_progress=False)
    edited = datasets.load_from_disk(str(tmp_path / "ds-edited"))
    assert edited["caption"] == dataset["caption"]
    expected = edit_embeddings(model, np.asarray(dataset["embedding"]))  # python floats: stored as float64
    assert np.array_equal(np.asarray(edited["embedding"]), expected)
    assert edited._fingerprint != datasets.load_from_disk(str(tmp_path / "ds"))._fingerprint


def test_one_npy_file_in_one_file_out_with_its_record_beside_it(model, tmp_path):
    stored = vectors(20, 5, np.float32, normalized=False)
    np.save(tmp_path / "vectors.npy", stored)
    edit_index(embedding_edit(model), tmp_path / "vectors.npy", tmp_path / "edited.npy", show_progress=False)
    assert np.array_equal(np.load(tmp_path / "edited.npy"), edit_embeddings(model, stored))
    record = json.loads((tmp_path / "edited.npy.hf_clip_forget.json").read_text())
    assert record["normalized"] is False and record["vectors"] == 20


def test_an_interrupted_run_resumes_at_the_first_unfinished_shard(model, tmp_path):
    source = clip_retrieval_index(tmp_path / "index", shards=4)
    edit, seen = embedding_edit(model), []

    def interrupted(run, shards):
        for shard in shards:
            if len(seen) == 2:
                raise KeyboardInterrupt  # killed after two shards
            seen.append(shard.path)
            yield run(shard)

    with pytest.raises(KeyboardInterrupt):
        edit_index(edit, source, tmp_path / "edited", mapper=interrupted, show_progress=False)
    assert not os.path.exists(tmp_path / "edited")  # nothing published
    resumed = []

    def counting(run, shards):
        for shard in shards:
            resumed.append(shard.path)
            yield run(shard)

    edit_index(edit, source, tmp_path / "edited", mapper=counting, show_progress=False)
    assert resumed == ["img_emb/img_emb_2.npy", "img_emb/img_emb_3.npy"]
    fresh = edit_index(edit, source, tmp_path / "fresh", show_progress=False)
    assert digests(tmp_path / "edited") == {**digests(tmp_path / "fresh"), "hf_clip_forget_index.json": digests(
        tmp_path / "edited")["hf_clip_forget_index.json"]}  # fmt: skip
    assert (
        fresh.provenance["output"] == json.loads((tmp_path / "edited/hf_clip_forget_index.json").read_text())["output"]
    )


def test_what_would_be_wrong_is_refused_before_anything_is_written(model, tmp_path):
    source = clip_retrieval_index(tmp_path / "index")
    edit = embedding_edit(model)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="new path"):
        edit_index(edit, source, tmp_path / "taken", show_progress=False)
    with pytest.raises(ValueError, match="must not contain each other"):
        edit_index(edit, source, tmp_path / "index" / "inside", show_progress=False)
    np.save(tmp_path / "wide.npy", np.zeros((3, DIM + 2), np.float32))
    with pytest.raises(ValueError, match=f"holds {DIM + 2}-dimensional vectors"):
        edit_index(edit, tmp_path / "wide.npy", tmp_path / "wide-edited.npy", show_progress=False)
    edit_index(edit, source, tmp_path / "edited", show_progress=False)
    with pytest.raises(ValueError, match="already an edited index"):
        edit_index(edit, tmp_path / "edited", tmp_path / "twice", show_progress=False)
    mixed = vectors(10, 1, np.float32)
    mixed[0] *= 3
    np.save(tmp_path / "mixed.npy", mixed)
    with pytest.raises(ValueError, match="normalized=True"):
        edit_index(edit, tmp_path / "mixed.npy", tmp_path / "mixed-edited.npy", show_progress=False)
    leftovers = sorted(n for n in os.listdir(tmp_path) if n.startswith(".") or "twice" in n or "-edited" in n)
    assert leftovers == []  # no output, no staging folder
    with pytest.raises(ValueError, match="--column"):
        pq.write_table(pa.table({"e": [[1.0] * DIM]}), tmp_path / "t.parquet")
        edit_index(edit, tmp_path / "t.parquet", tmp_path / "t2.parquet", show_progress=False)


def test_the_command_line_edits_an_index_with_a_saved_adapter(model, tmp_path):
    from hf_clip_forget.cli import main

    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_clip().add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), show_progress=False).save_pretrained(
            tmp_path / "adapter"
        )
    source = clip_retrieval_index(tmp_path / "index", shards=2)
    args = ["edit-index", model_dir, "--adapter", str(tmp_path / "adapter"), "--input", source]
    assert main([*args, "--output", str(tmp_path / "edited")]) == 0
    record = json.loads((tmp_path / "edited" / "hf_clip_forget_index.json").read_text())
    assert record["edit"]["forgotten"] == {"default": ["truck"]} and record["vectors"] == 100
    assert main([*args, "--output", str(tmp_path / "edited")]) == 2  # exists: one clear error line


def test_the_command_line_audits_a_labelled_index_and_records_the_audit(tmp_path, capsys):
    from hf_clip_forget.cli import main

    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_clip().add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), show_progress=False).save_pretrained(
            tmp_path / "adapter"
        )
    source = clip_retrieval_index(tmp_path / "index", shards=2, rows=30)
    names = ["truck", "ship", "tree"]
    for i in range(2):  # clip-retrieval's metadata rows belong to the vectors of the same shard number
        pq.write_table(
            pa.table({"label": [names[j % 3] for j in range(30)]}), f"{source}/metadata/metadata_{i}.parquet"
        )
    args = ["edit-index", model_dir, "--adapter", str(tmp_path / "adapter"), "--input", source]
    assert main([*args, "--output", str(tmp_path / "edited"), "--audit-labels", "label", "--audit-sample", "30"]) == 0
    printed = capsys.readouterr().out
    assert "Index audit of truck (30 stored image vectors)" in printed and "text→image R-precision" in printed
    assert "note (default): Measured" in printed  # a plain nullspace edit: measured not to make an index forget
    record = json.loads((tmp_path / "edited" / "hf_clip_forget_index.json").read_text())
    assert record["audit"]["stored"] == 30 and record["audit"]["sampled_from"] == 60
    assert record["audit"]["forgotten_classes"] == ["truck"] and record["audit"]["label_column"] == "label"
    assert main([*args, "--output", str(tmp_path / "x"), "--audit-labels", "missing"]) == 2  # a clear error
    assert not (tmp_path / "x").exists()


def test_shards_of_every_size_edited_through_one_reused_buffer_are_each_their_own_edit(model, tmp_path):
    """One worker edits every shard through the same reused memory: larger, smaller, larger again and empty shards
    each come out as the edit of their own rows (nothing left over from the shard before)."""
    source = tmp_path / "vectors"
    source.mkdir()
    sizes = [40, 7, 0, 90, 3]
    for index, rows in enumerate(sizes):
        np.save(source / f"part_{index}.npy", vectors(rows, 300 + index, np.float32))
    edit_index(embedding_edit(model), source, tmp_path / "out", workers=1, show_progress=False)
    for index, rows in enumerate(sizes):
        stored = np.load(source / f"part_{index}.npy")
        edited = np.load(tmp_path / "out" / f"part_{index}.npy")
        assert edited.shape == (rows, DIM)
        np.testing.assert_array_equal(edited, edit_embeddings(model, stored, normalized=True))


def test_shard_buffers_pickle_empty_and_are_reused_per_thread():
    import pickle

    from hf_clip_forget.index.shards import ShardBuffers

    buffers = ShardBuffers()
    first = buffers.output((4, 3), np.float32)
    first[:] = 1
    again = buffers.output((2, 3), np.float16)
    assert np.shares_memory(first, again)  # reused, not reallocated
    assert not np.shares_memory(first, buffers.output((100, 3), np.float32))  # grown when too small
    copy = pickle.loads(pickle.dumps(buffers))
    assert copy.output((1, 1), np.float32).size == 1 and not np.shares_memory(copy.output((1,), np.uint8), first)
