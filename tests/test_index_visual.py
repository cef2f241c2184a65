"""The index-only visual erasure (``hf_clip_forget.index.visual``, ``edit-index --erase-visual``): it is the
projection it says composed after the adapter's edit, queries need no change, it makes image→image search of a
forgotten class fall to chance on real PACS images, and the command records it or refuses before writing."""

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn.functional import normalize

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.evaluation import project_image_features
from hf_clip_forget.index import EmbeddingEdit
from hf_clip_forget.index.retrieval import INDEX_RECOMMENDED_OPTIONS, chance_spread, image_query_precision
from hf_clip_forget.index.visual import MIN_MEMBERS, visual_erasure, with_visual_erasure
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

from .real_data import demo_model_on_pacs, needs_pacs


def clustered(classes: int = 4, per_class: int = 60, dim: int = 24, seed: int = 0):
    """Vectors around one centre per class (each with its own spread directions), and the centres as "text"."""
    generator = torch.Generator().manual_seed(seed)
    centres = normalize(torch.randn(classes, dim, generator=generator, dtype=torch.float64), dim=-1)
    rows, labels = [], []
    for label in range(classes):
        spread = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        weights = torch.randn(per_class, 3, generator=generator, dtype=torch.float64)
        noise = 0.05 * torch.randn(per_class, dim, generator=generator, dtype=torch.float64)
        rows.append(centres[label] + 0.3 * weights @ normalize(spread, dim=-1) + noise)
        labels += [label] * per_class
    return normalize(torch.cat(rows), dim=-1), torch.tensor(labels), centres


def random_edit(dim: int, rank: int = 2, seed: int = 1) -> EmbeddingEdit:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(dim, rank, generator=generator) * 0.3
    return EmbeddingEdit("image", dim, left, left + 0.1 * torch.randn(dim, rank, generator=generator))


def test_the_composed_edit_is_the_projection_after_the_adapters_edit():
    rows, _, centres = clustered()
    edit = random_edit(rows.shape[1])
    erasure = visual_erasure(rows, centres[:1], centres[1:], ["a"], ["b", "c", "d"], edit=edit, rank=3)
    basis = erasure.basis.double()
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-6)
    assert basis.shape[1] == 1 + 1 + 3  # the text direction, the mean difference, 3 contrastive directions
    composed = with_visual_erasure(edit, erasure)
    projector = torch.eye(rows.shape[1], dtype=torch.float64) - basis @ basis.T
    # float32 factors: entries of P M agree to ~1e-6 (d = 24 terms of float32 products)
    assert torch.allclose(composed.matrix(), projector @ edit.matrix(), atol=1e-5)
    text = normalize(centres[0], dim=-1)
    assert (basis.T @ text).norm() > 1 - 1e-6  # the class's text direction is removed
    record = composed.to_dict()["visual_erasure"]
    assert record["members"] == {"a": erasure.members["a"]} and record["directions"] == 5
    assert edit.to_dict()["visual_erasure"] is None  # the adapter's own edit says it is the model's


def test_queries_need_no_change_the_ranking_is_the_projected_queries():
    """``P`` is a symmetric projector: q · P x = (P q) · (P x), so ranking unit-normalised erased vectors for a raw
    query ranks them as for the projected query."""
    rows, _, centres = clustered(seed=3)
    erasure = visual_erasure(rows, centres[:1], centres[1:], ["a"], ["b", "c", "d"])
    basis = erasure.basis.double()
    erased = normalize(rows - rows @ basis @ basis.T, dim=-1)
    queries = rows[::17]
    raw = (queries @ erased.T).argsort(dim=1)
    projected = ((queries - queries @ basis @ basis.T) @ erased.T).argsort(dim=1)
    assert torch.equal(raw, projected)


def test_image_queries_of_the_erased_class_fall_to_chance_and_the_others_stay():
    rows, labels, centres = clustered(per_class=80, seed=5)
    before = [float(image_query_precision(rows, labels == c).mean()) for c in range(4)]
    erasure = visual_erasure(rows, centres[:1], centres[1:], ["a"], ["b", "c", "d"], rank=3)
    erased = with_visual_erasure(random_edit(rows.shape[1], rank=0), erasure).apply(rows.float(), normalized=True)
    after = [float(image_query_precision(erased, labels == c).mean()) for c in range(4)]
    chance, margin = 79 / 319, 3 * chance_spread(80, 320)
    assert before[0] > chance + margin and after[0] <= chance + margin
    assert min(after[1:]) > chance + margin  # the other classes still find themselves


def test_what_cannot_be_estimated_is_refused_with_the_reason():
    rows, _, centres = clustered()
    with pytest.raises(ValueError, match="retain_classes"):
        visual_erasure(rows, centres[:1], centres[:0], ["a"], [])
    far = -centres[:1]  # no stored vector is nearest to this "class"
    with pytest.raises(ValueError, match=f"at least {MIN_MEMBERS}"):
        visual_erasure(rows, far, centres[1:], ["ghost"], ["b", "c", "d"])
    corrupt = rows.clone()
    corrupt[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        visual_erasure(corrupt, centres[:1], centres[1:], ["a"], ["b", "c", "d"])
    with pytest.raises(ValueError, match="do not fit together"):
        visual_erasure(rows, centres[:1, :5], centres[1:], ["a"], ["b", "c", "d"])


@needs_pacs
def test_on_pacs_an_erased_index_no_longer_finds_the_forgotten_class_by_image():
    """140 PACS test images (5 per domain × class), the demo model, the recommended index edit forgetting "house":
    house images retrieve houses far above chance before, and within 3 random-ranking standard deviations of
    chance (:func:`chance_spread`) once the visual erasure is added (estimated from these vectors, no labels)."""
    model, tokenizer, features, text = demo_model_on_pacs(5)
    names = list(features.class_names)
    stored = project_image_features(model, features)
    others = [n for n in names if n != "house"]
    edited = add_forget_adapter(model, ["house"], tokenizer, retain_classes=others, show_progress=False,
                                **INDEX_RECOMMENDED_OPTIONS)  # fmt: skip
    try:
        from hf_clip_forget.index import embedding_edit

        edit = embedding_edit(edited)
    finally:
        edited.unload()
    house = names.index("house")
    erasure = visual_erasure(stored, text[house : house + 1], text[[names.index(n) for n in others]], ["house"],
                             others, edit=edit)  # fmt: skip
    relevant = torch.as_tensor(features.labels) == house
    count = int(relevant.sum())
    chance, margin = (count - 1) / (len(stored) - 1), 3 * chance_spread(count - 1, len(stored) - 1)
    before = image_query_precision(stored, relevant).mean()
    name_only = image_query_precision(edit.apply(stored), relevant).mean()
    erased = image_query_precision(with_visual_erasure(edit, erasure).apply(stored), relevant).mean()
    assert before > chance + margin
    assert erased <= chance + margin and erased < name_only  # below what the name-built edit alone leaves


# ------------------------------------------------------------------------------------------------ the command
DIM = 16


@pytest.fixture
def command(tmp_path):
    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    generator = np.random.default_rng(0)
    os.makedirs(tmp_path / "index" / "img_emb")
    os.makedirs(tmp_path / "index" / "metadata")
    for shard in range(2):
        values = generator.standard_normal((60, DIM)).astype(np.float32)
        np.save(
            tmp_path / "index" / "img_emb" / f"img_emb_{shard}.npy", values / np.linalg.norm(values, axis=1)[:, None]
        )
        pq.write_table(pa.table({"url": [str(i) for i in range(60)]}), tmp_path / "index" / "metadata" /
                       f"metadata_{shard}.parquet")  # fmt: skip

    def adapter(name: str, **options) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny_clip().add_forget_adapter(["truck"], tokenizer=tiny_tokenizer(), show_progress=False,
                                           **options).save_pretrained(tmp_path / name)  # fmt: skip
        return str(tmp_path / name)

    return model_dir, str(tmp_path / "index"), adapter


def test_the_command_erases_and_records_what_it_did(command, tmp_path, capsys):
    from hf_clip_forget.cli import main
    from hf_clip_forget.cli.loading import load_adapter
    from hf_clip_forget.evaluation import class_embeddings
    from hf_clip_forget.index import embedding_edit
    from hf_clip_forget.index.labels import stored_sample
    from hf_clip_forget.index.shards import discover_layout

    model_dir, source, adapter = command
    saved = adapter("adapter", retain_classes=["ship", "tree"])
    out = tmp_path / "edited"
    assert main(["edit-index", model_dir, "--adapter", saved, "--input", source, "--output", str(out),
                 "--erase-visual", "--visual-rank", "2"]) == 0  # fmt: skip
    assert "visual erasure (index only)" in capsys.readouterr().out
    record = json.loads((out / "hf_clip_forget_index.json").read_text())["edit"]["visual_erasure"]
    assert record["contrastive_directions_per_class"] == 2 and record["sample"] == 120 and record["competitors"] == 2
    # the output is exactly the recorded erasure after the adapter's edit, recomputed by the public functions
    from hf_clip_forget.cli.loading import load_dual_encoder

    model, tokenizer, _ = load_dual_encoder(model_dir, image_processor=False)
    edited = load_adapter(model, saved)
    with edited.disable_adapter():
        text = class_embeddings(edited, tokenizer, ["truck", "ship", "tree"], show_progress=False)
    sample = stored_sample(discover_layout(source, "image", None))
    edit = embedding_edit(edited)
    erasure = visual_erasure(sample, text[:1], text[1:], ["truck"], ["ship", "tree"], edit=edit, rank=2)
    assert erasure.to_dict()["basis_sha256"] == record["basis_sha256"]
    stored = np.load(os.path.join(source, "img_emb", "img_emb_1.npy"))
    expected = with_visual_erasure(edit, erasure).apply(stored, normalized=True)
    np.testing.assert_array_equal(np.load(out / "img_emb" / "img_emb_1.npy"), expected)


@pytest.mark.parametrize(
    ("options", "extra", "message"),
    [
        ({}, [], "names no others"),
        ({"retain_classes": ["ship"], "domains": ["sketch"], "retain_domains": ["photo"]}, [], "some domains only"),
        ({"retain_classes": ["ship", "tree"]}, ["--side", "text"], "not of texts"),
        ({"retain_classes": ["ship", "tree"]}, ["--visual-rank", "-1"], "--visual-rank"),
    ],
)
def test_the_command_refuses_what_it_cannot_erase_before_writing(command, tmp_path, capsys, options, extra, message):
    from hf_clip_forget.cli import main

    model_dir, source, adapter = command
    saved = adapter("adapter", **options)
    code = main(["edit-index", model_dir, "--adapter", saved, "--input", source, "--output", str(tmp_path / "out"),
                 "--erase-visual", *extra])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
