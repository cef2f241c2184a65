"""FAISS indexes rebuilt from edited vectors (``--faiss-index``, a FAISS index as the only input): searching the
rebuilt index gives what searching a fresh index of the same factory string built from ``edit_embeddings``' output
gives (exactly, for Flat; trained on the same rows, for IVF and PQ), in the same order, with the same ids; every
refusal comes before anything is written."""

import hashlib
import json
import os
import warnings

import faiss
import numpy as np
import pytest

from hf_clip_forget.index import edit_embeddings, edit_index, embedding_edit
from hf_clip_forget.index.faiss_index import FaissIndexError, edit_faiss_index, faiss_rebuilder
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

from .test_index_run import DIM, clip_retrieval_index, vectors


IP, L2 = faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_clip().add_forget_adapter(["truck", "tree"], tokenizer=tiny_tokenizer(), show_progress=False)


def built(factory: str, rows: np.ndarray, metric=IP, ids=None):
    """What a user's pipeline does: an index of ``factory`` trained on and holding ``rows`` (as float32)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    index = faiss.index_factory(rows.shape[1], factory, metric)
    if not index.is_trained:
        index.train(rows)
    if ids is None:
        index.add(rows)
    else:
        index.add_with_ids(rows, ids)
    return index


def stored_input(root, shards=3) -> np.ndarray:
    return np.concatenate([np.load(os.path.join(root, "img_emb", f"img_emb_{i}.npy")) for i in range(shards)])


def assert_same_search(rebuilt, fresh, queries, k=10):
    distances, ids = rebuilt.search(queries, k)
    fresh_distances, fresh_ids = fresh.search(queries, k)
    assert np.array_equal(ids, fresh_ids)
    assert np.array_equal(distances, fresh_distances)


def sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.mark.parametrize(("factory", "metric", "trained"), [("Flat", IP, False), ("IVF4,Flat", L2, True),
                                                            ("PQ4x4", IP, True)])  # fmt: skip
def test_an_index_given_with_its_vectors_is_rebuilt_from_the_edited_vectors(model, tmp_path, factory, metric, trained):
    source = clip_retrieval_index(tmp_path / "index")
    stored = stored_input(source)
    faiss.write_index(built(factory, stored, metric), str(tmp_path / "image.index"))
    edit = embedding_edit(model)
    finish = faiss_rebuilder(edit, tmp_path / "image.index", source, tmp_path / "edited", show_progress=False)
    result = edit_index(edit, source, tmp_path / "edited", finish=finish, show_progress=False)
    rebuilt = faiss.read_index(str(tmp_path / "edited" / "image.index"))
    edited = edit_embeddings(model, stored).astype(np.float32)  # the shards hold float16, as the input did
    fresh = built(factory, edited, metric)
    queries = np.concatenate([edited[::25], vectors(5, 9, np.float32)])
    assert_same_search(rebuilt, fresh, queries)
    if factory == "Flat":
        assert np.array_equal(rebuilt.reconstruct_n(0, rebuilt.ntotal), edited)
    record = json.loads((tmp_path / "edited" / "hf_clip_forget_index.json").read_text())
    assert record == result.provenance
    section = record["faiss"]
    assert section["factory"] == factory and section["ntotal"] == 150 and section["d"] == DIM
    assert section["metric"] == ("inner_product" if metric == IP else "l2")
    assert section["sha256"] == sha256(tmp_path / "edited" / "image.index")
    assert (section["trained"] is not None) == trained and section["checked"]["matched"] == section["checked"]["rows"]
    if trained:
        assert section["trained"]["rows"] == 150


def test_settings_and_ids_are_kept_and_a_one_file_index_gets_its_faiss_file_beside_it(model, tmp_path):
    stored = vectors(200, 4, np.float32)
    np.save(tmp_path / "vectors.npy", stored)
    original = built("IDMap,IVF4,Flat", stored, IP, ids=np.arange(200) * 7 + 3)
    faiss.extract_index_ivf(original).nprobe = 3
    faiss.write_index(original, str(tmp_path / "knn.faiss"))
    edit = embedding_edit(model)
    finish = faiss_rebuilder(edit, tmp_path / "knn.faiss", tmp_path / "vectors.npy", tmp_path / "edited.npy",
                             show_progress=False)  # fmt: skip
    edit_index(edit, tmp_path / "vectors.npy", tmp_path / "edited.npy", finish=finish, show_progress=False)
    rebuilt = faiss.read_index(str(tmp_path / "edited.faiss"))
    assert faiss.extract_index_ivf(rebuilt).nprobe == 3
    assert np.array_equal(faiss.vector_to_array(rebuilt.id_map), np.arange(200) * 7 + 3)
    fresh = built("IDMap,IVF4,Flat", edit_embeddings(model, stored), IP, ids=np.arange(200) * 7 + 3)
    faiss.extract_index_ivf(fresh).nprobe = 3
    assert_same_search(rebuilt, fresh, stored[::20])
    record = json.loads((tmp_path / "edited.npy.hf_clip_forget.json").read_text())
    assert record["faiss"]["file"] == "edited.faiss" and record["faiss"]["parameters"][0]["nprobe"] == 3
    assert sorted(os.listdir(tmp_path)) == ["edited.faiss", "edited.npy", "edited.npy.hf_clip_forget.json",
                                            "knn.faiss", "vectors.npy"]  # fmt: skip


def test_an_index_inside_the_input_folder_is_replaced_not_carried_stale(model, tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    parts = [vectors(60, seed, np.float32) for seed in (1, 2)]
    for i, part in enumerate(parts):
        np.save(folder / f"part-{i}.npy", part)
    faiss.write_index(built("Flat", np.concatenate(parts)), str(folder / "knn.index"))
    edit = embedding_edit(model)
    finish = faiss_rebuilder(edit, folder / "knn.index", folder, tmp_path / "edited", show_progress=False)
    edit_index(edit, folder, tmp_path / "edited", finish=finish, show_progress=False)
    rebuilt = faiss.read_index(str(tmp_path / "edited" / "knn.index"))
    assert np.array_equal(rebuilt.reconstruct_n(0, 120), edit_embeddings(model, np.concatenate(parts)))


@pytest.mark.parametrize("factory", ["Flat", "IDMap,Flat", "IVF4,Flat", "HNSW8"])
def test_an_index_that_stores_its_vectors_is_edited_alone(model, tmp_path, factory):
    stored = vectors(150, 6, np.float32)
    ids = np.arange(150)[::-1].copy() if factory.startswith("IDMap") else None
    faiss.write_index(built(factory, stored, IP, ids=ids), str(tmp_path / "knn.index"))
    edit = embedding_edit(model)
    result = edit_faiss_index(edit, tmp_path / "knn.index", tmp_path / "edited.index", show_progress=False)
    rebuilt = faiss.read_index(str(tmp_path / "edited.index"))
    edited = edit_embeddings(model, stored)
    if factory != "HNSW8":  # an HNSW graph built again is equivalent, not the same graph: its vectors are checked
        assert_same_search(rebuilt, built(factory, edited, IP, ids=ids), stored[::15])
    storage = faiss.downcast_index(rebuilt.index if ids is not None else rebuilt)
    if factory == "HNSW8":
        storage = faiss.downcast_index(storage.storage)
    if factory == "IVF4,Flat":
        storage.make_direct_map()
    assert np.array_equal(storage.reconstruct_n(0, 150), edited)
    record = json.loads((tmp_path / "edited.index.hf_clip_forget.json").read_text())
    assert record == result.provenance and record["vectors"] == 150 and record["input"]["layout"] == "faiss"
    assert record["faiss"]["sha256"] == sha256(tmp_path / "edited.index")
    with pytest.raises(ValueError, match="already an edited index"):
        edit_faiss_index(edit, tmp_path / "edited.index", tmp_path / "twice.index", show_progress=False)


def test_what_cannot_be_rebuilt_exactly_is_refused_before_anything_is_written(model, tmp_path):
    source = clip_retrieval_index(tmp_path / "index")
    stored = stored_input(source)
    edit = embedding_edit(model)
    cases = {
        "fewer.index": (built("Flat", stored[:-1]), "built from other vectors"),
        "wide.index": (built("Flat", np.zeros((150, DIM + 2), np.float32)), f"holds {DIM + 2}-dimensional"),
        "other.index": (built("Flat", vectors(150, 77)), "not built from the input vectors"),
        "shuffled.index": (built("PQ4x4", stored[::-1]), "not built from the input vectors"),
        "normed.index": (built("L2norm,Flat", stored), "cannot give the factory string"),
        "ids.index": (faiss.index_factory(DIM, "IVF4,Flat"), "add_with_ids"),
    }
    ivf = cases["ids.index"][0]
    ivf.train(stored.astype(np.float32))
    ivf.add_with_ids(stored.astype(np.float32), np.arange(150) + 1000)
    for name, (index, message) in cases.items():
        faiss.write_index(index, str(tmp_path / name))
        with pytest.raises(FaissIndexError, match=message):
            faiss_rebuilder(edit, tmp_path / name, source, tmp_path / "edited", show_progress=False)
    for factory in ("IVF4,PQ4x4", "HNSW8,SQ8"):  # alone, a compressed index cannot give its vectors back
        faiss.write_index(built(factory, stored), str(tmp_path / "compressed.index"))
        with pytest.raises(FaissIndexError, match="reconstructing them is lossy: give the embeddings"):
            edit_faiss_index(edit, tmp_path / "compressed.index", tmp_path / "edited.index", show_progress=False)
    faiss.write_index(built("Flat", stored), str(tmp_path / "good.index"))
    with pytest.raises(FileExistsError, match="faiss-output"):
        faiss_rebuilder(edit, tmp_path / "good.index", source, tmp_path / "edited", name="img_emb/img_emb_0.npy")
    assert sorted(n for n in os.listdir(tmp_path) if "edited" in n or n.startswith(".")) == []


def test_the_command_line_rebuilds_an_index_and_edits_one_alone(model, tmp_path):
    from hf_clip_forget.cli import main

    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_clip().add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), show_progress=False).save_pretrained(
            tmp_path / "adapter"
        )
    source = clip_retrieval_index(tmp_path / "index", shards=2)
    faiss.write_index(built("Flat", stored_input(source, 2)), str(tmp_path / "image.index"))
    args = ["edit-index", model_dir, "--adapter", str(tmp_path / "adapter")]
    faiss_args = ["--faiss-index", str(tmp_path / "image.index")]
    assert main([*args, "--input", source, "--output", str(tmp_path / "edited"), *faiss_args]) == 0
    record = json.loads((tmp_path / "edited" / "hf_clip_forget_index.json").read_text())
    assert record["faiss"]["ntotal"] == 100 and os.path.isfile(tmp_path / "edited" / "image.index")
    alone = ["--input", str(tmp_path / "image.index"), "--output", str(tmp_path / "edited.index")]
    assert main([*args, *alone]) == 0 and os.path.isfile(tmp_path / "edited.index")
    assert main([*args, *alone]) == 2  # exists: one clear error line
