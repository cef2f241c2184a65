"""Forget adapters on tiny random CLIPModel / VisionTextDualEncoderModel: guarantees, merge, stack, save, load."""

import copy

import pytest
import torch
from peft import PeftModel

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import (
    class_embeddings,
    image_features,
    max_abs_cos,
    projection_weights,
    text_features,
)


FORGET = ["cat", "dog"]


def forget(model, tokenizer, classes=FORGET, **options):
    return model.add_forget_adapter(classes, tokenizer=tokenizer, show_progress=False, **options)


def test_add_forget_adapter_returns_a_peft_model_with_no_trainable_parameters(make_model, tokenizer):
    model = forget(make_model(), tokenizer)
    assert isinstance(model, PeftModel) and isinstance(model, ForgetPeftModel)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert isinstance(model.base_model.model.visual_projection, ProjectionEditLayer)
    assert not isinstance(model.base_model.model.text_projection, ProjectionEditLayer)
    config = model.peft_config["default"]
    assert isinstance(config, ProjectionEditConfig)
    assert config.forgotten_classes == FORGET and config.method == "nullspace" and len(config.templates) == 80
    buffers = {name: b for name, b in model.named_buffers() if "projection_edit_forget" in name}
    assert [b.dtype for b in buffers.values()] == [torch.float32] and list(buffers.values())[0].shape == (16, 2)


def test_alpha_one_removes_every_forgotten_direction_from_image_features(make_model, tokenizer, pixels):
    base = make_model()
    directions = class_embeddings(base, tokenizer, FORGET)
    before = image_features(base, pixels)
    assert max_abs_cos(before, directions) > 0.05  # there was something to remove
    model = forget(base, tokenizer)
    assert max_abs_cos(image_features(model, pixels), directions) <= 1e-5
    # also with a single template that the edit did not use: the forgotten classes' span is what matters
    model.merge_adapter()
    assert max_abs_cos(image_features(model, pixels), directions) <= 1e-5


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_partial_alpha_scales_the_forget_component_by_exactly_one_minus_alpha(make_model, tokenizer, pixels, alpha):
    base = make_model()
    directions = class_embeddings(base, tokenizer, FORGET)
    before = image_features(base, pixels) @ directions.T
    model = forget(base, tokenizer, alpha=alpha)
    after = image_features(model, pixels) @ directions.T
    torch.testing.assert_close(after, (1 - alpha) * before, atol=1e-5 * before.abs().max().item(), rtol=0)


def test_ccup_keeps_retain_directions_within_its_bound(tokenizer, make_model):
    base = make_model()
    retain = ["bird", "frog", "ship", "truck"]
    forget_dirs = class_embeddings(base, tokenizer, FORGET, retain_named=True).double()
    retain_dirs = class_embeddings(base, tokenizer, retain, retain_named=True).double()
    lam, mu = 1000.0, 100.0
    model = forget(
        base, tokenizer, method="ccup", retain_classes=retain, ccup_lambda=lam, ccup_mu=mu, keep_shared_direction=False
    )
    # the text-space operator M (the image-side layer applies Mᵀ, see the next test)
    m = model.base_model.model.visual_projection.combined_edit(["default"]).matrix().double().T
    shift = (m @ retain_dirs.T - retain_dirs.T).norm()
    assert shift <= (lam / mu) ** 0.5 * forget_dirs.norm()  # the stated tolerance
    nullspace = forget(make_model(), tokenizer).base_model.model.visual_projection.combined_edit(["default"])
    p = nullspace.matrix().double()
    assert shift < (p @ retain_dirs.T - retain_dirs.T).norm()
    # M is the CCUP optimum: no worse than keeping everything (I) or forgetting blindly (the nullspace projector)
    eye = torch.eye(m.shape[0], dtype=torch.float64)

    def objective(x):
        return (
            ((x - eye) ** 2).sum()
            + lam * ((x @ forget_dirs.T) ** 2).sum()
            + mu * ((x @ retain_dirs.T - retain_dirs.T) ** 2).sum()
        )

    assert objective(m) <= min(objective(eye), objective(p)) * (1 + 1e-6)
    assert model.peft_config["default"].retain_classes == retain


def test_an_image_side_ccup_edit_gives_images_the_logits_of_the_edited_text_directions(make_model, tokenizer, pixels):
    """Image embeddings v are edited by Mᵀ, so that every logit v'·t equals v·(M t): the forgotten classes' logits
    are those of M T_f ≈ 0 and the retained ones those of M T_r ≈ T_r, for every image."""
    base = make_model()
    retain = ["bird", "frog", "ship", "truck"]
    forget_dirs = class_embeddings(base, tokenizer, FORGET, retain_named=True).double()
    retain_dirs = class_embeddings(base, tokenizer, retain, retain_named=True).double()
    before = image_features(base, pixels).double()
    model = forget(base, tokenizer, method="ccup", retain_classes=retain, keep_shared_direction=False)
    m = model.base_model.model.visual_projection.combined_edit(["default"]).matrix().double().T
    assert (m - m.T).abs().max() > 1e-3  # CCUP's M is not symmetric: the orientation matters
    after = image_features(model, pixels).double()
    scale = before.norm(dim=-1).max().item()
    directions = torch.cat([forget_dirs, retain_dirs])
    torch.testing.assert_close(after @ directions.T, before @ (m @ directions.T), atol=1e-5 * scale, rtol=0)
    assert (after @ forget_dirs.T).abs().max() <= 0.25 * (
        before @ forget_dirs.T
    ).abs().max()  # tiny towers: close classes
    # and the retained logits move less than under the plain nullspace projector
    nullspace = image_features(forget(make_model(), tokenizer), pixels).double()
    assert (after @ retain_dirs.T - before @ retain_dirs.T).norm() < (
        nullspace @ retain_dirs.T - before @ retain_dirs.T
    ).norm()


def _shared_direction(*embeddings: torch.Tensor) -> torch.Tensor:
    rows = torch.nn.functional.normalize(torch.cat(embeddings).double(), dim=-1)
    return torch.nn.functional.normalize(rows.mean(dim=0), dim=0)


def test_keeping_the_shared_direction_removes_only_what_is_specific_to_the_forgotten_classes(
    make_model, tokenizer, pixels
):
    base = make_model()
    retain = ["bird", "frog", "ship", "truck"]
    forget_dirs = class_embeddings(base, tokenizer, FORGET, retain_named=True).double()
    shared = _shared_direction(forget_dirs, class_embeddings(base, tokenizer, retain, retain_named=True))
    specific = forget_dirs - (forget_dirs @ shared)[:, None] * shared[None]  # t_f − (t_f·s) s
    before = image_features(base, pixels).double()
    model = forget(base, tokenizer, retain_classes=retain)
    assert model.peft_config["default"].keep_shared_direction  # the default once retain classes are named
    after = image_features(model, pixels).double()
    scale = before.norm(dim=-1).max().item()
    # the image features lose every forget-specific component …
    assert (after @ specific.T).abs().max().item() <= 1e-5 * scale
    # … keep their shared component exactly, so a forgotten class's logit is its share of s: (t_f·s)(v·s)
    torch.testing.assert_close(after @ shared, before @ shared, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(
        after @ forget_dirs.T, (after @ shared)[:, None] * (forget_dirs @ shared)[None], atol=1e-5 * scale, rtol=0
    )
    # whereas the plain nullspace sends those logits to 0, shared part included
    plain = forget(make_model(), tokenizer, retain_classes=retain, keep_shared_direction=False)
    assert not plain.peft_config["default"].keep_shared_direction
    assert (image_features(plain, pixels).double() @ forget_dirs.T).abs().max().item() <= 1e-5 * scale
    assert (after @ forget_dirs.T).abs().max().item() > 1e-2 * scale


def test_ccup_with_the_shared_direction_kept_is_the_optimum_of_its_objective(make_model, tokenizer):
    base = make_model()
    retain = ["bird", "frog", "ship", "truck"]
    forget_dirs = class_embeddings(base, tokenizer, FORGET, retain_named=True).double()
    retain_dirs = class_embeddings(base, tokenizer, retain, retain_named=True).double()
    shared = _shared_direction(forget_dirs, retain_dirs)
    specific = torch.nn.functional.normalize(forget_dirs - (forget_dirs @ shared)[:, None] * shared[None], dim=-1)
    kept = torch.cat([retain_dirs, shared[None]])
    lam, mu = 1000.0, 100.0
    model = forget(base, tokenizer, method="ccup", retain_classes=retain, ccup_lambda=lam, ccup_mu=mu)
    assert model.peft_config["default"].keep_shared_direction
    m = model.base_model.model.visual_projection.combined_edit(["default"]).matrix().double().T
    eye = torch.eye(m.shape[0], dtype=torch.float64)

    def objective(x):
        return ((x - eye) ** 2).sum() + lam * ((x @ specific.T) ** 2).sum() + mu * ((x @ kept.T - kept.T) ** 2).sum()

    perturbed = m + 1e-3 * torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert objective(m) <= min(objective(eye), objective(perturbed)) * (1 + 1e-9)
    assert (m @ shared - shared).norm() <= (lam / mu) ** 0.5 * specific.norm()


@pytest.mark.parametrize("method", ["nullspace", "ccup"])
def test_merged_and_unmerged_forwards_agree(make_model, tokenizer, pixels, method):
    options = {"retain_classes": ["bird", "frog"]} if method == "ccup" else {}
    model = forget(make_model(), tokenizer, method=method, target="both", **options)
    inputs = tokenizer(["a photo of a cat.", "a photo of a ship."], padding=True, return_tensors="pt")
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
    with torch.no_grad():
        unmerged = model(**kwargs).logits_per_image
        model.merge_adapter()
        merged = model(**kwargs).logits_per_image
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_weights_bit_for_bit_after_1000_cycles(make_model, tokenizer, dtype):
    model = forget(make_model(dtype=dtype), tokenizer)
    model.add_forget_adapter(["bird"], tokenizer=tokenizer, adapter_name="birds", show_progress=False)
    original = projection_weights(model)
    edited_once = None
    for _ in range(1000):
        model.merge_adapter()
        edited_once = edited_once if edited_once is not None else projection_weights(model)
        model.unmerge_adapter()
    restored = projection_weights(model)
    assert all(torch.equal(restored[name], original[name]) for name in original)
    assert any(not torch.equal(edited_once[name], original[name]) for name in original)  # merging did edit


def test_incremental_merges_are_the_union_and_unmerge_exactly(tokenizer, pixels):
    from hf_clip_forget.testing_utils import tiny_clip

    model = forget(tiny_clip(), tokenizer, ["cat"], adapter_name="cats")
    model.add_forget_adapter(["dog"], tokenizer=tokenizer, adapter_name="dogs", show_progress=False)
    unmerged = image_features(model, pixels)
    original = projection_weights(model)
    # a merged weight M·W (float32 sums over the 16 embedding dims) then applied (over the 32 hidden features) rounds
    # in another order than the layer's x·Wᵀ then its edit: off by up to about (16 + 32) × eps relative to the scale
    tol = 48 * torch.finfo(torch.float32).eps * float(unmerged.abs().max())
    model.merge_adapter(["cats"])
    torch.testing.assert_close(image_features(model, pixels), unmerged, atol=tol, rtol=0)  # dogs still applied
    model.merge_adapter(["dogs"])
    torch.testing.assert_close(image_features(model, pixels), unmerged, atol=tol, rtol=0)
    model.unmerge_adapter()
    assert all(torch.equal(w, original[n]) for n, w in projection_weights(model).items())


def test_save_and_load_give_identical_outputs(make_model, tokenizer, pixels, tmp_path):
    model = forget(make_model(), tokenizer, method="ccup", retain_classes=["bird"], target="both")
    model.add_forget_adapter(["truck"], tokenizer=tokenizer, adapter_name="trucks", alpha=0.5, show_progress=False)
    expected_image = image_features(model, pixels)
    expected_text = text_features(model, tokenizer, ["a photo of a cat.", "a photo of a truck."])
    model.save_pretrained(tmp_path)

    reloaded = ForgetPeftModel.from_pretrained(make_model(), tmp_path)
    assert sorted(reloaded.active_adapters) == ["default", "trucks"]
    assert torch.equal(image_features(reloaded, pixels), expected_image)
    assert torch.equal(text_features(reloaded, tokenizer, ["a photo of a cat.", "a photo of a truck."]), expected_text)
    assert reloaded.peft_config["trucks"].alpha == 0.5
    assert reloaded.forgotten_classes == {"default": FORGET, "trucks": ["truck"]}

    # plain peft loading of one adapter works as peft users expect
    single = PeftModel.from_pretrained(make_model(), tmp_path / "trucks", adapter_name="trucks")
    alone = forget(make_model(), tokenizer, ["truck"], alpha=0.5, adapter_name="trucks")
    assert torch.equal(image_features(single, pixels), image_features(alone, pixels))


def test_saved_config_says_what_it_forgets(tokenizer, tmp_path):
    from hf_clip_forget.testing_utils import tiny_clip

    model = forget(tiny_clip(), tokenizer, method="ccup", retain_classes=["bird"], templates="single")
    model.save_pretrained(tmp_path)
    config = ProjectionEditConfig.from_pretrained(tmp_path)
    assert config.forgotten_classes == FORGET and config.retain_classes == ["bird"]
    assert config.method == "ccup" and config.templates == ["a photo of a {}."]
    assert config.ccup_lambda == 1000.0 and config.ccup_mu == 100.0 and config.alpha == 1.0
    assert config.projection_shapes == {"visual_projection": [16, 32]}


def test_stacking_overlapping_forget_sets_is_their_union(make_model, tokenizer, pixels):
    base = make_model()
    reference = copy.deepcopy(base)
    first, second = ["cat", "dog"], ["dog", "bird"]
    directions = class_embeddings(base, tokenizer, first + ["bird"])
    model = forget(base, tokenizer, first, adapter_name="first")
    model.add_forget_adapter(second, tokenizer=tokenizer, adapter_name="second", show_progress=False)
    assert model.active_adapters == ["first", "second"]
    stacked = image_features(model, pixels)
    assert max_abs_cos(stacked, directions) <= 1e-5  # nothing of the first set leaks back
    union = forget(reference, tokenizer, ["cat", "dog", "bird"])
    torch.testing.assert_close(stacked, image_features(union, pixels), atol=1e-5, rtol=1e-4)


def test_deleting_a_middle_adapter_leaves_exactly_the_others(make_model, tokenizer, pixels):
    base = make_model()
    reference = copy.deepcopy(base)
    model = forget(base, tokenizer, ["cat"], adapter_name="first")
    model.add_forget_adapter(["dog"], tokenizer=tokenizer, adapter_name="middle", show_progress=False)
    model.add_forget_adapter(["truck"], tokenizer=tokenizer, adapter_name="last", alpha=0.5, show_progress=False)
    model.delete_adapter("middle")
    assert model.active_adapters == ["first", "last"] and sorted(model.peft_config) == ["first", "last"]
    expected = forget(reference, tokenizer, ["cat"], adapter_name="first")
    expected.add_forget_adapter(["truck"], tokenizer=tokenizer, adapter_name="last", alpha=0.5, show_progress=False)
    assert torch.equal(image_features(model, pixels), image_features(expected, pixels))


def test_disable_unload_and_merge_and_unload(make_model, tokenizer, pixels):
    base = make_model()
    original_output = image_features(base, pixels)
    original_weights = projection_weights(base)
    model = forget(base, tokenizer)
    edited = image_features(model, pixels)
    with model.disable_adapter():
        assert torch.equal(image_features(model, pixels), original_output)
    assert torch.equal(image_features(model, pixels), edited)

    model.merge_adapter()
    plain = model.unload()  # the original base model, even when merged
    assert type(plain).__name__ in ("CLIPModel", "VisionTextDualEncoderModel")
    assert all(torch.equal(w, original_weights[n]) for n, w in projection_weights(plain).items())

    merged = forget(plain, tokenizer).merge_and_unload()
    assert not any(isinstance(m, ProjectionEditLayer) for m in merged.modules())
    torch.testing.assert_close(image_features(merged, pixels), edited, atol=1e-5, rtol=1e-5)


def test_text_target_sends_forgotten_prompts_to_generic_ones_and_keeps_retain_prompts(tokenizer):
    from hf_clip_forget.testing_utils import tiny_clip

    base = tiny_clip()
    kept_prompts = ["a photo of a bird.", "a photo of a ship.", "a photo of a ."]
    before = text_features(base, tokenizer, kept_prompts)
    model = forget(base, tokenizer, ["cat"], target="text", retain_classes=["bird", "ship"], templates="single")
    assert isinstance(model.base_model.model.text_projection, ProjectionEditLayer)
    assert not isinstance(model.base_model.model.visual_projection, ProjectionEditLayer)
    torch.testing.assert_close(text_features(model, tokenizer, kept_prompts), before, atol=1e-5, rtol=1e-5)
    cat = text_features(model, tokenizer, ["a photo of a cat."])
    kept_basis = torch.linalg.qr(before.T.double())[0]
    outside = cat.double() - (cat.double() @ kept_basis) @ kept_basis.T
    assert outside.norm() <= 1e-5 * cat.norm() and cat.norm() > 1e-3


def test_forward_and_feature_methods_pass_through(tokenizer, pixels):
    from hf_clip_forget.testing_utils import tiny_clip

    model = forget(tiny_clip(), tokenizer)
    reference = tiny_clip()
    with torch.no_grad():
        w = model.base_model.model.visual_projection
        reference.visual_projection.weight.copy_(w.combined_edit(["default"]).apply_to_weight(w.weight.float()))
    inputs = tokenizer(["a photo of a cat."], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=pixels)
        ref = reference(input_ids=inputs["input_ids"], pixel_values=pixels)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=1e-5, rtol=1e-5)
    # the reference's merged weight M·W vs the layer's x·Wᵀ then its edit: float32 sums over the 16 embedding dims and
    # the 32 hidden features in another order, off by up to about (16 + 32) × eps relative to the scale
    expected = image_features(reference, pixels)
    torch.testing.assert_close(
        image_features(model, pixels),
        expected,
        atol=48 * torch.finfo(torch.float32).eps * float(expected.abs().max()),
        rtol=0,
    )


def test_precomputed_text_embeds_replace_class_names(tokenizer, pixels):
    from hf_clip_forget.testing_utils import tiny_clip

    directions = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    model = add_forget_adapter(tiny_clip(), text_embeds=directions, classes=["x", "y", "z"])
    assert max_abs_cos(image_features(model, pixels), directions) <= 1e-5
    assert model.peft_config["default"].embedding_source == "text_embeds"
    assert model.peft_config["default"].forgotten_classes == ["x", "y", "z"]


def test_the_module_function_and_the_model_method_are_the_same(tokenizer, pixels):
    from hf_clip_forget.testing_utils import tiny_clip

    a = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False)
    b = tiny_clip().add_forget_adapter(["cat"], tokenizer=tokenizer, show_progress=False)
    assert torch.equal(image_features(a, pixels), image_features(b, pixels))


def test_stacking_onto_a_peft_loaded_model_and_onto_a_merged_model(tokenizer, pixels, tmp_path):
    from hf_clip_forget.testing_utils import tiny_clip

    forget(tiny_clip(), tokenizer, ["cat"]).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)  # a plain PeftModel of forget adapters
    loaded.merge_adapter()
    merged_weights = projection_weights(loaded)
    stacked = add_forget_adapter(loaded, ["dog"], tokenizer, adapter_name="dogs", show_progress=False)
    assert stacked is loaded and loaded.active_adapters == ["default", "dogs"]
    # the merged adapter stays merged (same bits), the new one is applied on top
    assert all(torch.equal(w, merged_weights[n]) for n, w in projection_weights(loaded).items())
    directions = class_embeddings(tiny_clip(), tokenizer, ["cat", "dog"])
    assert max_abs_cos(image_features(loaded, pixels), directions) <= 1e-5


def test_casting_the_model_keeps_the_factors_in_float32(tokenizer, pixels):
    from hf_clip_forget.testing_utils import tiny_clip

    base = tiny_clip()
    directions = class_embeddings(base, tokenizer, FORGET)
    model = forget(base, tokenizer).to(torch.bfloat16)
    factors = [b for n, b in model.named_buffers() if "projection_edit_forget" in n]
    assert factors and all(f.dtype == torch.float32 for f in factors)
    # orthonormal columns rounded to float32, multiplied in float32: each entry a sum over the 16 embedding dims
    torch.testing.assert_close(
        factors[0].T @ factors[0], torch.eye(2), atol=16 * torch.finfo(torch.float32).eps, rtol=0
    )
    # the edit itself stays exact; what is left is the bf16 rounding of the output (~1e-2 relative)
    assert max_abs_cos(image_features(model, pixels.to(torch.bfloat16)), directions) <= 2e-2


def test_the_default_templates_are_7_for_a_global_image_side_edit_naming_its_retain_classes_else_80(
    make_model, tokenizer
):
    from hf_clip_forget.core import IMAGENET_TEMPLATES
    from hf_clip_forget.core.templates import IMAGENET_SELECTED_TEMPLATES

    with_retain = forget(make_model(), tokenizer, retain_classes=["bird"]).peft_config["default"]
    plain = forget(make_model(), tokenizer).peft_config["default"]
    text_side = forget(make_model(), tokenizer, target="text", retain_classes=["bird"]).peft_config["default"]
    chosen = forget(make_model(), tokenizer, templates="imagenet_selected").peft_config["default"]
    assert with_retain.templates == list(IMAGENET_SELECTED_TEMPLATES)  # measured: docs/templates.md
    assert plain.templates == list(IMAGENET_TEMPLATES) == text_side.templates
    assert len(chosen.templates) == 7 and set(chosen.templates) <= set(IMAGENET_TEMPLATES)
