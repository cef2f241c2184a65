"""Every supported dual-encoder family, on a tiny random instance: the edit is exact through the family's own feature
functions and forward, on both sides, and merges, unmerges (bit for bit, biases included), saves and stacks."""

import pytest
import torch

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.core import SINGLE_TEMPLATE, image_side_embeddings, text_side_embeddings
from hf_clip_forget.families import SUPPORTED_MODEL_CLASSES, family_of, family_of_class
from hf_clip_forget.testing_utils import TINY_MODEL_CLASSES, tiny_model, tiny_pixel_inputs
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import class_embeddings, features, max_abs_cos, state_snapshot


# Class names that sort after the template words: OWL-ViT pools text at the largest token id, the alphabetically last
# word with tiny_tokenizer, so "cat" and "dog" would give it one and the same "a photo of a {}." embedding.
FORGET = ["truck", "tree"]
PROMPTS = ["a photo of a truck.", "a photo of a ship.", "a bad photo of the tree."]

#: Written out, so that a family dropped from (or added to) the table fails here until this list says so.
EXPECTED_CLASSES = (
    "CLIPModel", "VisionTextDualEncoderModel", "MetaClip2Model", "CLIPSegModel", "AltCLIPModel", "ChineseCLIPModel",
    "Aimv2Model", "BlipModel", "OwlViTModel", "Owlv2Model", "SiglipModel", "OwlViTForObjectDetection",
    "Owlv2ForObjectDetection", "ClapModel", "GroupViTModel", "AlignModel", "Siglip2Model",
    "FlavaModel", "BlipForImageTextRetrieval",
)  # fmt: skip
#: Checked by their own files: detectors (tests/test_detection.py) and audio models (tests/test_audio.py).
NOT_IMAGE_TEXT = ("OwlViTForObjectDetection", "Owlv2ForObjectDetection", "ClapModel")
DUAL_ENCODERS = [name for name in SUPPORTED_MODEL_CLASSES if name not in NOT_IMAGE_TEXT]

every_family = pytest.mark.parametrize("class_name", DUAL_ENCODERS)


def mergeable(class_name: str) -> bool:
    family = family_of_class(class_name)
    return family.image.mergeable and family.text.mergeable


MERGEABLE = [name for name in DUAL_ENCODERS if mergeable(name)]
NOT_MERGEABLE = [name for name in DUAL_ENCODERS if not mergeable(name)]


def forget(model, tokenizer, classes=FORGET, **options):
    return model.add_forget_adapter(classes, tokenizer=tokenizer, show_progress=False, **options)


#: Forward options that make it return the contrastive scores: BLIP retrieval's default forward is its ITM head
#: (the text tower cross-attending to image tokens), which the joint layers do not reach.
FORWARD_OPTIONS = {"BlipForImageTextRetrieval": {"use_itm_head": False}}
#: Classes whose forward exposes no joint image embeddings, and why; test_the_forwards_contrastive_scores_… checks
#: that their forward's scores are the declared embeddings' cosines instead.
FORWARD_WITHOUT_IMAGE_EMBEDS = {
    "FlavaModel": "its forward returns the towers' unprojected hidden states (the logits are FlavaForPreTraining's)",
    "BlipForImageTextRetrieval": "its forward returns only the cosine matrix of the two sides' embeddings",
}


def image_embeddings(model, class_name) -> torch.Tensor:
    """The family's image embeddings as it declares them (``hf_clip_forget.core.image_side_embeddings``)."""
    with torch.no_grad():
        return image_side_embeddings(model, **tiny_pixel_inputs(class_name))


def tokenize(model, tokenizer, prompts):
    """Prompts padded as the family's text tower expects (SigLIP: to its fixed length)."""
    family = family_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if family.text_padding == "max_length":
        return tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt")
    return tokenizer(prompts, padding=True, return_tensors="pt")


def text_features(model, tokenizer, prompts) -> torch.Tensor:
    inputs = tokenize(model, tokenizer, prompts)
    with torch.no_grad():
        return text_side_embeddings(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def forward(model, class_name, tokenizer, prompts=PROMPTS, batch_size=4):
    inputs = tokenize(model, tokenizer, prompts)
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            **tiny_pixel_inputs(class_name, batch_size), **FORWARD_OPTIONS.get(class_name, {}),
        )  # fmt: skip


def forward_cosines(model, class_name, tokenizer, prompts=PROMPTS) -> torch.Tensor | None:
    """The image × text cosines a class's own forward computes where it exposes no ``logits_per_image``, for as
    many images as prompts: BLIP retrieval's ``use_itm_head=False`` output, FLAVA's pre-training contrastive logits
    over their scale; ``None`` for the other classes."""
    if class_name == "BlipForImageTextRetrieval":
        return forward(model, class_name, tokenizer, prompts, batch_size=len(prompts)).itm_score
    if class_name == "FlavaModel":  # FlavaForPreTraining's contrastive head, run on this (edited) FlavaModel
        import transformers

        flava = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = transformers.FlavaForPreTraining(flava.config).eval()
        head.flava = flava
        inputs = tokenize(model, tokenizer, prompts)
        with torch.no_grad():  # its multimodal pass needs as many images as prompts
            output = head(**inputs, **tiny_pixel_inputs(class_name, len(prompts)), return_loss=False)
        return output.contrastive_logits_per_image / flava.logit_scale.exp()
    return None


def outputs(model, class_name, tokenizer) -> dict[str, torch.Tensor]:
    """Image and text embeddings of the family's embedding functions, and the forward's logits (cosines for BLIP
    retrieval and FLAVA's pre-training head, see :func:`forward_cosines`)."""
    cosines = forward_cosines(model, class_name, tokenizer)
    return {
        "image": image_embeddings(model, class_name),
        "text": text_features(model, tokenizer, PROMPTS),
        "logits": forward(model, class_name, tokenizer).logits_per_image if cosines is None else cosines,
    }


def single_template_embeddings(model, tokenizer, classes) -> torch.Tensor:
    return class_embeddings(model, tokenizer, classes, templates=SINGLE_TEMPLATE)


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's own state under a peft wrapper: wrapped layers' weights under their plain names."""
    state = model.get_base_model().state_dict()
    return {
        name.replace(".base_layer.", "."): value for name, value in state.items() if "projection_edit_" not in name
    }


def test_the_family_table_lists_exactly_the_checked_classes_and_each_has_a_tiny_model():
    assert set(SUPPORTED_MODEL_CLASSES) == set(EXPECTED_CLASSES)
    assert len(SUPPORTED_MODEL_CLASSES) == len(EXPECTED_CLASSES)  # no class in two families
    assert set(TINY_MODEL_CLASSES) >= set(SUPPORTED_MODEL_CLASSES)


@every_family
def test_tiny_models_are_reproducible_and_fit_the_tiny_tokenizer(class_name):
    model = tiny_model(class_name, seed=3)
    assert type(model).__name__ == class_name and family_of(model) is not None and not model.training
    text = model.config.text_config
    assert text.vocab_size == 1000 and text.max_position_embeddings >= 64
    assert model.get_submodule(family_of(model).text.module).out_features == (
        32 if class_name in ("SiglipModel", "Siglip2Model") else 16
    )
    again = tiny_model(class_name, seed=3)
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in model.state_dict().items())
    pixels, pixels_again = tiny_pixel_inputs(class_name, batch_size=2), tiny_pixel_inputs(class_name, batch_size=2)
    assert all(torch.equal(value, pixels_again[name]) for name, value in pixels.items())
    # SigLIP 2 takes pre-cut 8×8 patches (at most 16 per image) with their mask and grid shapes
    assert pixels["pixel_values"].shape == ((2, 16, 3 * 8 * 8) if class_name == "Siglip2Model" else (2, 3, 32, 32))


@every_family
def test_visual_edit_removes_the_forgotten_classes_from_feature_and_forward_image_embeddings(class_name, tokenizer):
    base = tiny_model(class_name)
    directions = class_embeddings(base, tokenizer, FORGET)  # the default 80 templates, as the edit uses
    assert max_abs_cos(image_embeddings(base, class_name), directions) > 1e-3  # there was something to remove
    model = forget(base, tokenizer)
    family = family_of(model.get_base_model())
    assert isinstance(model.get_base_model().get_submodule(family.image.module), ProjectionEditLayer)
    assert not isinstance(model.get_base_model().get_submodule(family.text.module), ProjectionEditLayer)
    assert max_abs_cos(image_embeddings(model, class_name), directions) <= 1e-5
    if class_name not in FORWARD_WITHOUT_IMAGE_EMBEDS:
        assert max_abs_cos(forward(model, class_name, tokenizer).image_embeds, directions) <= 1e-5


@every_family
def test_half_alpha_halves_the_forget_component(class_name, tokenizer):
    base = tiny_model(class_name)
    directions = single_template_embeddings(base, tokenizer, FORGET)
    before = image_embeddings(base, class_name) @ directions.T
    after = image_embeddings(forget(base, tokenizer, alpha=0.5, templates="single"), class_name) @ directions.T
    torch.testing.assert_close(after, 0.5 * before, atol=1e-5 * before.abs().max().item(), rtol=0)


@every_family
def test_both_sides_keep_retain_prompts_and_send_forgotten_prompts_to_kept_ones(class_name, tokenizer):
    base = tiny_model(class_name)
    kept_prompts = ["a photo of a ship.", "a photo of a rocket.", "a photo of a ."]  # retain classes and the anchor
    kept_before = text_features(base, tokenizer, kept_prompts)
    forgotten_before = text_features(base, tokenizer, ["a photo of a truck."]).double()
    direction = single_template_embeddings(base, tokenizer, ["truck"])
    model = forget(
        base, tokenizer, ["truck"], target="both", retain_classes=["ship", "rocket"], templates="single",
        keep_shared_direction=False,
    )  # fmt: skip
    family = family_of(model.get_base_model())
    assert all(
        isinstance(model.get_base_model().get_submodule(name), ProjectionEditLayer)
        for name in (family.image.module, family.text.module)
    )
    torch.testing.assert_close(text_features(model, tokenizer, kept_prompts), kept_before, atol=1e-5, rtol=1e-5)
    forgotten = text_features(model, tokenizer, ["a photo of a truck."]).double()
    kept_basis = torch.linalg.qr(kept_before.T.double())[0]

    def outside_kept_span(x):
        return (x - (x @ kept_basis) @ kept_basis.T).norm()

    # the forgotten prompt was outside the kept prompts' span (a little, in a random BERT tower) and is now inside
    assert outside_kept_span(forgotten_before) > 5e-4 * forgotten_before.norm()
    assert outside_kept_span(forgotten) <= 1e-5 * forgotten.norm()
    assert max_abs_cos(image_embeddings(model, class_name), direction) <= 1e-5


@pytest.mark.parametrize("class_name", MERGEABLE)
def test_merge_matches_unmerged_unmerge_restores_every_weight_and_bias_and_merge_and_unload(class_name, tokenizer):
    base = tiny_model(class_name)
    snapshot = state_snapshot(base)
    model = forget(base, tokenizer, target="both", templates="single")
    unmerged = outputs(model, class_name, tokenizer)

    model.merge_adapter()
    merged = outputs(model, class_name, tokenizer)
    for name, value in unmerged.items():
        torch.testing.assert_close(merged[name], value, atol=1e-5, rtol=1e-5, msg=name)
    state = base_state(model)
    edited = [name for name in snapshot if not torch.equal(state[name], snapshot[name])]
    family = family_of(model.get_base_model())
    expected = {f"{layer}.{p}" for layer in family.projections.values() for p in ("weight", "bias")}
    assert set(edited) == {name for name in expected if name in snapshot}  # b' = M b too where there is a bias

    model.unmerge_adapter()
    state = base_state(model)
    assert set(state) == set(snapshot)
    assert [name for name, value in snapshot.items() if not torch.equal(state[name], value)] == []
    torch.testing.assert_close(outputs(model, class_name, tokenizer)["image"], unmerged["image"], atol=0, rtol=0)

    plain = model.merge_and_unload()
    assert type(plain).__name__ == class_name and set(plain.state_dict()) == set(snapshot)
    assert not any(isinstance(module, ProjectionEditLayer) for module in plain.modules())
    for name, value in outputs(plain, class_name, tokenizer).items():
        torch.testing.assert_close(value, merged[name], atol=1e-6, rtol=1e-6, msg=name)


@every_family
def test_save_and_load_give_identical_outputs(class_name, tokenizer, tmp_path):
    model = forget(tiny_model(class_name), tokenizer, target="both", templates="single")
    expected = outputs(model, class_name, tokenizer)
    model.save_pretrained(tmp_path)
    reloaded = ForgetPeftModel.from_pretrained(tiny_model(class_name), tmp_path)
    for name, value in outputs(reloaded, class_name, tokenizer).items():
        assert torch.equal(value, expected[name]), name


@every_family
def test_stacked_adapters_remove_both_directions(class_name, tokenizer):
    base = tiny_model(class_name)
    directions = single_template_embeddings(base, tokenizer, ["truck", "rocket"])
    model = forget(base, tokenizer, ["truck"], templates="single")
    forget(model, tokenizer, ["rocket"], templates="single", adapter_name="rockets")
    assert model.active_adapters == ["default", "rockets"]
    assert max_abs_cos(image_embeddings(model, class_name), directions) <= 1e-5
    if class_name not in FORWARD_WITHOUT_IMAGE_EMBEDS:
        assert max_abs_cos(forward(model, class_name, tokenizer).image_embeds, directions) <= 1e-5


@pytest.mark.parametrize("target", ["visual", "text", "both"])
@pytest.mark.parametrize("class_name", sorted(FORWARD_WITHOUT_IMAGE_EMBEDS))
def test_the_forwards_contrastive_scores_are_the_declared_embeddings_and_lose_the_forgotten_prompt(
    class_name, target, tokenizer
):
    # the forgotten prompt, a kept one, and the bare template: the anchor a text-side edit sends forgotten prompts to
    prompts = ["a photo of a truck.", "a photo of a ship.", "a photo of a ."]
    base = tiny_model(class_name)

    def declared_cosines(model):
        with torch.no_grad():
            images = image_side_embeddings(model, **tiny_pixel_inputs(class_name, len(prompts)))
        texts = text_features(model, tokenizer, prompts)
        return torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T

    before = forward_cosines(base, class_name, tokenizer, prompts)
    # the forward's cosines and ours (|cos| ≤ 1) come through float32 sums in other orders (its normalisation, logit
    # scale and batches; the tiny towers' sums run over at most 64 terms): off by up to about 64 × eps
    torch.testing.assert_close(before, declared_cosines(base), atol=64 * torch.finfo(torch.float32).eps, rtol=0)
    assert before[:, 0].abs().min() > 1e-3 and (before[:, 0] - before[:, 2]).abs().min() > 1e-3
    model = forget(base, tokenizer, ["truck"], target=target, templates="single")
    after = forward_cosines(model, class_name, tokenizer, prompts)
    torch.testing.assert_close(after, declared_cosines(model), atol=64 * torch.finfo(torch.float32).eps, rtol=0)
    if target == "visual":  # every image is orthogonal to the forgotten prompt
        assert after[:, 0].abs().max() <= 1e-5
    else:  # the forgotten prompt now scores every image as the bare template does
        torch.testing.assert_close(after[:, 0], after[:, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("class_name", NOT_MERGEABLE)
def test_an_edit_that_cannot_be_merged_refuses_every_merge_and_changes_nothing(class_name, tokenizer, tmp_path):
    base = tiny_model(class_name)
    snapshot = state_snapshot(base)
    model = forget(base, tokenizer, target="both", templates="single")
    assert model.peft_config["default"].mergeable is False
    unmerged = outputs(model, class_name, tokenizer)
    for attempt in (model.merge_adapter, model.merge_and_unload, lambda: model.save_merged_pretrained(tmp_path / "m")):
        with pytest.raises(ValueError, match="cannot be written into weights"):
            attempt()
        assert base_state(model).keys() == snapshot.keys()
        assert all(torch.equal(base_state(model)[name], value) for name, value in snapshot.items())
        for name, value in outputs(model, class_name, tokenizer).items():
            assert torch.equal(value, unmerged[name]), name
    assert not (tmp_path / "m").exists()
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Not mergeable" in card and "model.merge_adapter()" not in card
    original = model.unload()
    assert not any(isinstance(module, ProjectionEditLayer) for module in original.modules())
    assert all(torch.equal(original.state_dict()[name], value) for name, value in snapshot.items())


@every_family
def test_the_evaluation_harness_reproduces_the_familys_image_embeddings_before_and_after_the_edit(
    class_name, tokenizer
):
    from hf_clip_forget.evaluation import pre_projection_features, project_image_features

    base = tiny_model(class_name)
    # what the harness caches once per image, from every input of the image processor (SigLIP 2: patches, mask, grid)
    cached = pre_projection_features(base, **tiny_pixel_inputs(class_name))
    torch.testing.assert_close(
        project_image_features(base, cached), image_embeddings(base, class_name), atol=1e-6, rtol=0
    )
    model = forget(base, tokenizer, templates="single")
    torch.testing.assert_close(
        project_image_features(model, cached), image_embeddings(model, class_name), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("class_name", MERGEABLE)
def test_prototype_features_are_one_vector_per_image_that_the_image_layer_maps_to_its_embedding(class_name):
    from hf_clip_forget.core import synthesize_prototypes

    model = tiny_model(class_name)
    targets = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    found = synthesize_prototypes(model, targets, per_target=2, steps=1, grid=8, image_size=32, show_progress=False)
    # FLAVA's image layer runs on every token: the feature is the embedding's token only
    assert found.features.ndim == 2 and found.features.shape[0] == 4
    with torch.no_grad():
        projected = model.get_submodule(family_of(model).image.module)(found.features)
    normalized = torch.nn.functional.normalize(projected.double(), dim=-1)
    # unit vectors from float32 projections of the same features in other batches: each a sum over the layer's input
    # width in another order, off by up to about width × eps
    torch.testing.assert_close(
        normalized, found.embeddings, atol=found.features.shape[-1] * torch.finfo(torch.float32).eps, rtol=0
    )


@pytest.mark.parametrize("class_name", ["SiglipModel", "Siglip2Model"])
def test_siglip_prompts_are_embedded_padded_to_the_models_fixed_length(class_name, tokenizer):
    from hf_clip_forget.core import encode_prompts

    model = tiny_model(class_name)
    prompts = ["a photo of a truck.", "a bad photo of the tree in a video game."]
    # SigLIP's documented usage: the tokenizer's outputs, padded to the fixed length, passed on as they are
    documented = tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = features(model.get_text_features(**documented))
    torch.testing.assert_close(
        encode_prompts(model, tokenizer, prompts, show_progress=False), expected, atol=1e-6, rtol=0
    )
    shortest = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        unpadded = features(model.get_text_features(**shortest))
    assert (unpadded - expected).abs().max() > 1e-3  # the padding matters: SigLIP reads the last position
