"""``edit_embeddings``: embeddings stored from the unedited model, edited with an adapter's edit, are the edited model's
embeddings of the same inputs — for every family and side, stacks, α, CCUP, merged or not, raw or normalised, in the
stored dtype; and what cannot be exact is refused."""

import warnings

import numpy as np
import pytest
import torch

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.core import image_side_embeddings, text_side_embeddings
from hf_clip_forget.families import family_of_class
from hf_clip_forget.index import UneditedSideWarning, edit_embeddings, embedding_edit, load_embedding_edit
from hf_clip_forget.testing_utils import (
    TINY_MODEL_CLASSES,
    tiny_audio_inputs,
    tiny_clip,
    tiny_model,
    tiny_pixel_inputs,
    tiny_tokenizer,
)


PROMPTS = ["a photo of a truck.", "a photo of a ship.", "a bad photo of the tree.", "a photo of a rocket."]
#: float32 rounding of a d ≤ 64 dot product and of the low-rank update: cosines agree far inside 1e-6.
COSINE_FLOOR = 1 - 1e-6


def side_of(class_name: str) -> str:
    return "audio" if family_of_class(class_name).inputs == "audio" else "image"


def embeddings(model, class_name: str, side: str, tokenizer) -> torch.Tensor:
    """The family's own embeddings of fixed inputs: text prompts, tiny images / sounds, or detected boxes."""
    family = family_of_class(class_name)
    with torch.no_grad():
        if side == "text":
            padding = {"padding": "max_length", "max_length": 64} if family.text_padding == "max_length" else {}
            inputs = tokenizer(PROMPTS, return_tensors="pt", **({"padding": True} | padding))
            return text_side_embeddings(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        if family.inputs == "audio":
            return image_side_embeddings(model, **tiny_audio_inputs())
        if family.detector:  # every box's class embedding, as the detector's forward returns them
            inputs = tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
            output = model(**inputs, **tiny_pixel_inputs(class_name, batch_size=2))
            return output.class_embeds.reshape(-1, output.class_embeds.shape[-1])
        return image_side_embeddings(model, **tiny_pixel_inputs(class_name))


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest row difference relative to the row's size."""
    return float(((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max())


def add(model, classes, tokenizer, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weak-edit estimates of tiny random models are beside the point here
        return model.add_forget_adapter(classes, tokenizer=tokenizer, show_progress=False, **options)


@pytest.mark.parametrize("class_name", TINY_MODEL_CLASSES)
def test_stored_embeddings_edited_are_the_edited_models_on_every_family_and_side(class_name):
    tokenizer, base = tiny_tokenizer(), tiny_model(class_name)
    sides = (side_of(class_name), "text")
    stored = {side: embeddings(base, class_name, side, tokenizer) for side in sides}
    model = add(base, ["truck"], tokenizer, target="both", templates="single")
    model = add(model, ["tree"], tokenizer, target="both", templates="single", method="ccup",
                retain_classes=["ship", "rocket"], adapter_name="ccup")  # fmt: skip
    model.base_model.set_adapter(["default", "ccup"])
    for side in sides:
        expected = embeddings(model, class_name, side, tokenizer)
        edited = edit_embeddings(model, stored[side], side=side)
        assert edited.dtype == stored[side].dtype and edited.shape == stored[side].shape
        assert cosines(edited, expected).min() >= COSINE_FLOOR, side
        # float32 rounding of the model's and of this computation, relative to the embeddings' size
        error, moved = relative(edited, expected), relative(stored[side], expected)
        assert error <= 1e-5 and moved >= 1e-3, (side, error, moved)  # the edit moved them: not the identity passing


def test_normalised_float16_and_bfloat16_rows_come_back_normalised_in_their_dtype(tokenizer):
    base = tiny_clip()
    raw = embeddings(base, "CLIPModel", "image", tokenizer)
    model = add(base, ["truck", "tree"], tokenizer, alpha=0.5)
    expected = torch.nn.functional.normalize(embeddings(model, "CLIPModel", "image", tokenizer), dim=-1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        stored = torch.nn.functional.normalize(raw, dim=-1).to(dtype)
        edited = edit_embeddings(model, stored)
        assert edited.dtype == dtype
        eps = torch.finfo(dtype).eps
        # one rounding of the stored rows and one of the result, each relative eps/2 per entry
        assert (edited.double().norm(dim=-1) - 1).abs().max() <= 2 * eps
        assert cosines(edited, expected).min() >= 1 - 4 * eps
        as_numpy = edit_embeddings(model, stored.float().numpy())
        assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32


def test_the_merged_model_and_the_unmerged_one_give_the_same_edit(tokenizer):
    base = tiny_clip()
    stored = embeddings(base, "CLIPModel", "image", tokenizer)
    model = add(base, ["truck"], tokenizer, method="ccup", retain_classes=["ship"])
    unmerged = edit_embeddings(model, stored)
    model.merge_adapter()
    merged_model = embeddings(model, "CLIPModel", "image", tokenizer)
    assert cosines(edit_embeddings(model, stored), merged_model).min() >= COSINE_FLOOR
    assert torch.equal(edit_embeddings(model, stored), unmerged)
    with model.disable_adapter():  # what the model applies now: nothing
        with pytest.warns(UneditedSideWarning):
            assert torch.equal(edit_embeddings(model, stored), stored)


def test_the_edit_is_low_rank_and_is_the_layers_map(tokenizer):
    model = add(tiny_clip(), ["truck", "tree"], tokenizer, target="both")
    edit = embedding_edit(model, "image")
    assert edit.rank == 2 and edit.left.shape == (edit.dim, 2)
    rows = torch.randn(5, edit.dim)
    assert torch.allclose(edit.apply(rows).double(), rows.double() @ edit.matrix().T, atol=1e-6)
    record = edit.to_dict()
    assert record["adapters"] == ["default"] and record["forgotten"] == {"default": ["truck", "tree"]}
    assert set(record["factor_checksums"]["default"]) == {"visual_projection.forget"}
    assert len(record["base_model_fingerprint"]) == 64


def test_a_side_no_adapter_edits_comes_back_unchanged_with_a_warning(tokenizer):
    model = add(tiny_clip(), ["truck"], tokenizer)  # image side only
    stored = embeddings(tiny_clip(), "CLIPModel", "text", tokenizer)
    with pytest.warns(UneditedSideWarning, match="text side"):
        assert torch.equal(edit_embeddings(model, stored, side="text"), stored)


def test_what_cannot_be_exact_is_refused_with_the_reason(tokenizer):
    model = add(tiny_clip(), ["truck"], tokenizer)
    dim = embedding_edit(model).dim
    with pytest.raises(ValueError, match=f"must be \\(n, {dim}\\)"):
        edit_embeddings(model, torch.randn(3, dim + 1))
    with pytest.raises(ValueError, match="`side` must be 'image' or 'text', got 'imag'"):
        edit_embeddings(model, torch.randn(3, dim), side="imag")
    with pytest.raises(ValueError, match="side='image'"):
        edit_embeddings(model, torch.randn(3, dim), side="audio")
    mixed = torch.nn.functional.normalize(torch.randn(4, dim), dim=-1)
    mixed[0] *= 3
    with pytest.raises(ValueError, match="normalized=True"):
        edit_embeddings(model, mixed)
    assert edit_embeddings(model, mixed, normalized=False).shape == mixed.shape
    with pytest.raises(TypeError, match="floating point"):
        edit_embeddings(model, torch.ones(2, dim, dtype=torch.int64))
    with pytest.raises(TypeError, match="holds no forget adapters"):
        edit_embeddings(tiny_clip(), torch.randn(2, dim))


def test_a_saved_adapter_gives_the_same_edit_and_leaves_the_base_as_it_was(tokenizer, tmp_path):
    model = add(tiny_clip(), ["truck"], tokenizer, method="ccup", retain_classes=["ship"])
    model.save_pretrained(tmp_path / "adapter")
    base = tiny_clip()
    loaded = load_embedding_edit(base, tmp_path / "adapter")
    stored = torch.randn(6, loaded.dim)
    assert torch.equal(loaded.apply(stored), edit_embeddings(model, stored))
    assert loaded.checksums == embedding_edit(model).checksums
    assert not any("projection_edit" in type(m).__module__ for m in base.modules())  # the base is left unwrapped
    assert not isinstance(base, ForgetPeftModel)


def test_a_zero_row_stays_zero():
    from hf_clip_forget.index import EmbeddingEdit

    basis = torch.eye(4)[:, :1]
    edit = EmbeddingEdit("image", 4, basis, basis)
    rows = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    out = edit.apply(rows, normalized=True)
    assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[1], rows[1])


def test_out_receives_the_same_edit_and_a_wrong_buffer_is_refused():
    from hf_clip_forget.index import EmbeddingEdit

    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    edit = EmbeddingEdit("image", 8, left, right)
    rows = torch.nn.functional.normalize(torch.randn(1500, 8, generator=generator), dim=-1).half().numpy()
    out = np.full_like(rows, np.nan)
    assert edit.apply(rows, out=out) is out
    np.testing.assert_array_equal(out, edit.apply(rows))
    identity = EmbeddingEdit("image", 8, torch.zeros(8, 0), torch.zeros(8, 0))
    np.testing.assert_array_equal(identity.apply(rows, out=np.empty_like(rows)), rows)
    with pytest.raises(ValueError, match="shape"):
        edit.apply(rows, out=np.empty((10, 8), np.float16))
    with pytest.raises(ValueError, match="dtype"):
        edit.apply(rows, out=np.empty(rows.shape, np.float32))
