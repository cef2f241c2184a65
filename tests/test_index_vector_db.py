"""A LanceDB table edited in place (``edit_lancedb_table`` / ``edit-index --lancedb``): after the edit each row's
vector is ``edit_embeddings`` of its vector before (float32 and float16, unit length and raw), every other column
and the indexes are kept, the provenance record is committed with the vectors; an edited table, another dimension
and a bad row are refused with the table left as it was; reverting restores the version the edit read."""

import json
import warnings

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from hf_clip_forget.index import edit_embeddings, embedding_edit
from hf_clip_forget.index.vector_db import (
    PROVENANCE_KEY,
    edit_lancedb_table,
    lancedb_provenance,
    revert_lancedb_table,
)
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

from .test_index_run import DIM, vectors


ROWS = 300


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_clip().add_forget_adapter(["truck", "tree"], tokenizer=tiny_tokenizer(), show_progress=False)


def make_table(uri, stored: np.ndarray, list_type=None, name="images"):
    list_type = list_type or pa.list_(pa.from_numpy_dtype(stored.dtype), stored.shape[1])
    data = pa.table({
        "id": np.arange(len(stored)),
        "caption": [f"image {i}" for i in range(len(stored))],
        "vector": pa.array(list(stored), type=list_type),
    })  # fmt: skip
    table = lancedb.connect(str(uri)).create_table(name, data, schema=data.schema)  # kept as given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table.create_index("id", config=lancedb.index.BTree())
    return table


def read(uri, name="images", version=None) -> pa.Table:
    table = lancedb.connect(str(uri)).open_table(name)
    if version is not None:
        table.checkout(version)
    return table.to_arrow().sort_by("id")


def column_vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("vector").to_numpy(zero_copy_only=False))


@pytest.mark.parametrize(
    ("dtype", "normalized", "list_type"),
    [(np.float32, True, None), (np.float16, False, pa.list_(pa.float16(), DIM))],
    ids=["float32-unit", "float16-raw"],
)
def test_the_table_is_edited_in_place_as_one_new_version(model, tmp_path, dtype, normalized, list_type):
    stored = vectors(ROWS, 3, dtype, normalized=normalized)
    table = make_table(tmp_path / "db", stored, list_type)
    table.create_index("vector", config=lancedb.index.IvfFlat(distance_type="cosine", num_partitions=2))
    before = table.version
    schema = table.schema
    result = edit_lancedb_table(embedding_edit(model), str(tmp_path / "db"), "images", batch_size=64,
                                show_progress=False)  # fmt: skip
    assert result.version_before == before and result.version == before + 1
    after = read(tmp_path / "db")
    edited = column_vectors(after)
    assert edited.dtype == dtype and np.array_equal(edited, edit_embeddings(model, stored))
    assert after.column("caption") == read(tmp_path / "db", version=before).column("caption")
    assert after.schema.field("vector").type == schema.field("vector").type
    record = json.loads(after.schema.field("vector").metadata[PROVENANCE_KEY.encode()])
    assert record == result.provenance == lancedb_provenance(str(tmp_path / "db"), "images")
    assert record["vectors"] == ROWS and record["normalized"] is normalized and record["input"]["version"] == before
    assert record["edit"]["forgotten"] == {"default": ["truck", "tree"]}
    reopened = lancedb.connect(str(tmp_path / "db")).open_table("images")
    indices = {index.name: index for index in reopened.list_indices()}  # the overwrite dropped them: recreated
    assert sorted(indices) == sorted(result.indices) == ["id_idx", "vector_idx"]
    assert (
        indices["vector_idx"].index_type == "IvfFlat"
        and indices["vector_idx"].index_details["metric_type"] == "COSINE"
    )
    assert f"hf-clip-forget-before-v{before}" in reopened.tags.list()


def test_an_edited_table_another_dimension_and_a_bad_row_are_refused_with_the_table_unchanged(model, tmp_path):
    edit = embedding_edit(model)
    uri = str(tmp_path / "db")
    wide = make_table(uri, vectors(20, 1, np.float32)[:, :DIM].repeat(2, axis=1)[:, : DIM + 2], name="wide")
    with pytest.raises(ValueError, match=f"holds {DIM + 2}-dimensional vectors"):
        edit_lancedb_table(edit, uri, "wide", show_progress=False)
    assert lancedb.connect(uri).open_table("wide").version == wide.version
    with pytest.raises(ValueError, match="no column 'embedding'"):
        edit_lancedb_table(edit, uri, "wide", "embedding", show_progress=False)
    with pytest.raises(ValueError, match="has no table 'missing'"):
        edit_lancedb_table(edit, uri, "missing", show_progress=False)
    make_table(uri, vectors(20, 2, np.float32), pa.list_(pa.float32()), name="variable")
    with pytest.raises(ValueError, match="not a fixed-size list of floats"):
        edit_lancedb_table(edit, uri, "variable", show_progress=False)
    mixed = vectors(ROWS, 5, np.float32)
    mixed[200:] *= 3  # a later batch is not unit length: found while writing, so nothing is committed
    table = make_table(uri, mixed, name="mixed")
    with pytest.raises(ValueError, match="normalized=True"):
        edit_lancedb_table(edit, uri, "mixed", batch_size=64, show_progress=False)
    reopened = lancedb.connect(uri).open_table("mixed")
    assert reopened.version == table.version and reopened.tags.list() == {}
    assert np.array_equal(column_vectors(read(uri, "mixed")), mixed)
    make_table(uri, vectors(50, 6, np.float32), name="images")
    edit_lancedb_table(edit, uri, "images", show_progress=False)
    edited = lancedb.connect(uri).open_table("images").version
    with pytest.raises(ValueError, match="already an edited table"):
        edit_lancedb_table(edit, uri, "images", show_progress=False)
    assert lancedb.connect(uri).open_table("images").version == edited


def test_reverting_restores_the_version_the_edit_read_and_it_can_be_edited_again(model, tmp_path):
    stored = vectors(ROWS, 8, np.float32)
    uri = str(tmp_path / "db")
    make_table(uri, stored)
    edit = embedding_edit(model)
    edit_lancedb_table(edit, uri, "images", show_progress=False)
    version = revert_lancedb_table(uri, "images")
    assert lancedb.connect(uri).open_table("images").version == version
    assert np.array_equal(column_vectors(read(uri)), stored) and lancedb_provenance(uri, "images") is None
    assert [index.name for index in lancedb.connect(uri).open_table("images").list_indices()] == ["id_idx"]
    with pytest.raises(ValueError, match="nothing to revert"):
        revert_lancedb_table(uri, "images")
    edit_lancedb_table(edit, uri, "images", show_progress=False)
    assert np.array_equal(column_vectors(read(uri)), edit_embeddings(model, stored))


def test_a_write_committed_by_another_process_meanwhile_is_reported(model, tmp_path, monkeypatch):
    from hf_clip_forget.index import vector_db

    uri = str(tmp_path / "db")
    make_table(uri, vectors(ROWS, 4, np.float32))
    batches = vector_db._edited_record_batches

    def with_a_concurrent_append(*args):
        for i, batch in enumerate(batches(*args)):
            if i == 1:
                other = lancedb.connect(uri).open_table("images")
                other.add(other.to_arrow().slice(0, 5))
            yield batch

    monkeypatch.setattr(vector_db, "_edited_record_batches", with_a_concurrent_append)
    with pytest.raises(RuntimeError, match="committed by another writer"):
        edit_lancedb_table(embedding_edit(model), uri, "images", batch_size=64, show_progress=False)


def test_the_command_line_edits_a_table_in_place(model, tmp_path):
    from hf_clip_forget.cli import main

    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_clip().add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), show_progress=False).save_pretrained(
            tmp_path / "adapter"
        )
    uri = str(tmp_path / "db")
    make_table(uri, vectors(40, 2, np.float32))
    args = ["edit-index", model_dir, "--adapter", str(tmp_path / "adapter"), "--lancedb", uri, "--table", "images"]
    assert main(args) == 0
    assert lancedb_provenance(uri, "images")["edit"]["forgotten"] == {"default": ["truck"]}
    assert main(args) == 2  # already edited: one clear error line
    assert main([*args, "--output", str(tmp_path / "out")]) == 2  # --lancedb edits in place: no --output
