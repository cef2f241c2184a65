"""The families whose image embedding is the output of a module that is not a Linear layer (ALIGN's average pooling,
SigLIP's and SigLIP 2's attention-pooling heads): what tests/test_families.py does not cover for them. The text side
merges bit for bit on its own; ALIGN's edit acts on the channel axis of the pooled map and nothing else; SigLIP 2's
patch inputs and ALIGN's prompt padding reach the model as its processor gives them."""

import pytest
import torch
from torch import nn

from hf_clip_forget.core import encode_prompts, image_side_embeddings, text_side_embeddings
from hf_clip_forget.core.joint_embeddings import accepted_inputs
from hf_clip_forget.families import family_of
from hf_clip_forget.testing_utils import tiny_model, tiny_pixel_inputs
from hf_clip_forget.tuners.projection_edit import EditSettings, Linear, OutputEdit, ProjectionEditLayer

from .conftest import max_abs_cos, state_snapshot


PROMPTS = ["a photo of a truck.", "a photo of a ship.", "a photo of a ."]  # forgotten, kept, bare template
OUTPUT_EDIT_CLASSES = ["AlignModel", "SiglipModel", "Siglip2Model"]
SETTINGS = EditSettings(method="nullspace", alpha=1.0, ccup_lambda=0.0, ccup_mu=0.0, rank_tolerance=1e-5)


def forget(model, tokenizer, classes=("truck",), **options):
    return model.add_forget_adapter(list(classes), tokenizer=tokenizer, show_progress=False, **options)


def tokenize(model, tokenizer, prompts=PROMPTS):
    padding = family_of(model.get_base_model() if hasattr(model, "get_base_model") else model).text_padding
    if padding == "max_length":
        return tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt")
    return tokenizer(prompts, padding=True, return_tensors="pt")


def text_embeddings(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    inputs = tokenize(model, tokenizer, prompts)
    with torch.no_grad():
        return text_side_embeddings(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def image_embeddings(model, class_name) -> torch.Tensor:
    with torch.no_grad():
        return image_side_embeddings(model, **tiny_pixel_inputs(class_name))


def forward_logits(model, class_name, tokenizer) -> torch.Tensor:
    inputs = tokenize(model, tokenizer)
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **tiny_pixel_inputs(class_name)
        ).logits_per_image


@pytest.mark.parametrize("class_name", OUTPUT_EDIT_CLASSES)
def test_the_text_side_alone_is_exact_and_merges_and_unmerges_bit_for_bit(class_name, tokenizer):
    base = tiny_model(class_name)
    snapshot = state_snapshot(base)
    before = text_embeddings(base, tokenizer)
    assert 1 - max_abs_cos(before[:1], before[2:]) > 1e-3  # the forgotten prompt is not the bare template
    images_before = image_embeddings(base, class_name)
    model = forget(base, tokenizer, target="text", templates="single")
    assert model.peft_config["default"].mergeable is True
    unmerged = text_embeddings(model, tokenizer)
    # the forgotten prompt now points where the bare template "a photo of a ." does, which is kept as it was
    assert 1 - max_abs_cos(unmerged[:1], unmerged[2:]) <= 1e-5
    torch.testing.assert_close(unmerged[2:], before[2:], atol=1e-5, rtol=1e-5)
    assert torch.equal(image_embeddings(model, class_name), images_before)  # the image side is untouched
    logits = forward_logits(model, class_name, tokenizer)  # and the forward scores it with every image alike
    torch.testing.assert_close(logits[:, 0], logits[:, 2], atol=1e-5 * logits.abs().max().item(), rtol=0)

    model.merge_adapter()
    torch.testing.assert_close(text_embeddings(model, tokenizer), unmerged, atol=1e-5, rtol=1e-5)
    state = {name.replace(".base_layer.", "."): value for name, value in model.get_base_model().state_dict().items()}
    edited = {name for name, value in snapshot.items() if not torch.equal(state[name], value)}
    layer = family_of(base).text.module
    assert edited == {f"{layer}.weight", f"{layer}.bias"}  # b' = M b as well as W' = M W

    model.unmerge_adapter()
    state = {name.replace(".base_layer.", "."): value for name, value in model.get_base_model().state_dict().items()}
    assert all(torch.equal(state[name], value) for name, value in snapshot.items())
    plain = model.merge_and_unload()
    assert not any(isinstance(module, ProjectionEditLayer) for module in plain.modules())
    torch.testing.assert_close(text_embeddings(plain, tokenizer), unmerged, atol=1e-5, rtol=1e-5)


def test_align_edits_only_the_pooled_channels_of_its_last_feature_map(tokenizer):
    base = tiny_model("AlignModel")
    pixels = tiny_pixel_inputs("AlignModel")
    with torch.no_grad():
        before = base.vision_model(**pixels)
    model = forget(base, tokenizer, ["truck", "tree"], templates="single")
    layer = model.get_base_model().vision_model.pooler
    assert isinstance(layer, OutputEdit) and layer.channel_dim == 1
    with torch.no_grad():
        after = model.get_base_model().vision_model(**pixels)
    assert before.last_hidden_state.shape[1] == 16 and before.last_hidden_state.shape[2:] != (1, 1)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)  # the feature map itself is not edited
    edit = layer.combined_edit(["default"])
    torch.testing.assert_close(after.pooler_output, edit.apply(before.pooler_output), atol=1e-6, rtol=0)
    assert (after.pooler_output - before.pooler_output).abs().max() > 1e-3


def test_an_output_edit_applies_its_edit_along_the_declared_channel_axis():
    torch.manual_seed(0)
    maps = torch.randn(3, 8, 5, 5)
    layer = OutputEdit(nn.AvgPool2d(5), "default", SETTINGS, forget_rank=1, embedding_dim=8, channel_dim=1)
    direction = torch.nn.functional.normalize(torch.randn(8, 1), dim=0)
    layer.set_factors("default", direction)
    pooled = layer(maps)
    assert pooled.shape == (3, 8, 1, 1)
    expected = maps.mean(dim=(2, 3)) - (maps.mean(dim=(2, 3)) @ direction) @ direction.T
    # AvgPool2d vs mean over the 5 × 5 positions, then a dot product over 8 channels: float32 sums in other orders,
    # off by up to about (25 + 8) × eps relative to the scale
    tol = (25 + 8) * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(pooled.flatten(1), expected, atol=tol, rtol=0)
    assert (pooled.flatten(1) @ direction).abs().max() <= tol
    # no parameters of its own: the factors follow dtype moves as float32 (no StopIteration looking for a device)
    layer.to(torch.float64)
    assert layer.projection_edit_forget["default"].dtype == torch.float32
    assert layer(maps.double()).dtype == torch.float64


def test_a_linear_forget_layer_refuses_another_channel_axis():
    with pytest.raises(ValueError, match="edits its output features, the last axis"):
        Linear(nn.Linear(4, 8), "default", SETTINGS, forget_rank=1, channel_dim=1)


def test_align_prompts_embed_alike_whatever_their_padding(tokenizer):
    # the library pads to the longest prompt; ALIGN's processor pads to 64 tokens. BERT read at token 0 under the
    # attention mask ignores padding, so both give the same embeddings (text_padding stays "longest")
    model = tiny_model("AlignModel")
    prompts = ["a photo of a truck.", "a bad photo of the tree in a video game."]
    processor_style = tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**processor_style).pooler_output
    assert family_of(model).text_padding == "longest"
    # float32 sums over up to 64 positions in another order (the padded ones masked out): each layer's attention
    # and matmul reductions may differ by about length × eps relative to the activations' scale
    tolerance = 64 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(
        encode_prompts(model, tokenizer, prompts, show_progress=False), expected, atol=tolerance, rtol=0
    )


def test_siglip2_image_embeddings_take_the_patch_mask_and_grid_shapes():
    model = tiny_model("Siglip2Model")
    inputs = tiny_pixel_inputs("Siglip2Model")
    assert {"pixel_values", "pixel_attention_mask", "spatial_shapes"} <= accepted_inputs(model, "visual")
    assert (inputs["pixel_attention_mask"] == 0).any()  # padded patches are present
    with torch.no_grad():
        expected = model.get_image_features(**inputs).pooler_output
        embeddings = image_side_embeddings(model, **inputs, input_ids=torch.zeros(4, 3, dtype=torch.long))
        unmasked = model.get_image_features(
            pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"]
        ).pooler_output
    assert torch.equal(embeddings, expected)
    assert (unmasked - expected).abs().max() > 1e-3  # the mask matters, so it must be (and is) passed on
