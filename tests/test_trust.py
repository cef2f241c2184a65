"""Issue 10, silent wrong edits: every entry point does what its config says, or refuses before changing anything."""

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from transformers import CLIPModel

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.families import UnsupportedModelError
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import assert_same_state, class_embeddings, image_features, max_abs_cos, state_snapshot


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    """A tiny CLIP saved with its tokenizer, as a Hub checkpoint would be: loading it sets ``name_or_path``."""
    directory = tmp_path / "tiny-clip"
    tiny_clip().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(checkpoint) -> CLIPModel:
    return CLIPModel.from_pretrained(checkpoint).eval()


def forgets(model, tokenizer, classes, pixels) -> bool:
    return max_abs_cos(image_features(model, pixels), class_embeddings(tiny_clip(), tokenizer, classes)) < 1e-5


def has_forget_layers(model) -> bool:
    return any(isinstance(module, ProjectionEditLayer) for module in model.modules())


# -------------------------------------------------------------------- 2: a second call stacks, never replaces
def test_a_second_add_forget_adapter_on_the_base_model_stacks_onto_the_first(tokenizer, pixels):
    base = tiny_clip()
    first = base.add_forget_adapter(["dog"], tokenizer=tokenizer, show_progress=False)
    second = base.add_forget_adapter(["cat"], tokenizer=tokenizer, show_progress=False)  # a re-run notebook cell
    assert second is first
    assert first.forgotten_classes == {"default": ["dog"], "forget_1": ["cat"]}
    assert forgets(first, tokenizer, ["dog", "cat"], pixels)


def test_adding_under_an_existing_name_through_plain_peft_is_refused(checkpoint, tokenizer):
    model = get_peft_model(load(checkpoint), ProjectionEditConfig(forgotten_classes=["dog"]))
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="already holds a forget adapter named 'default'"):
        inject_adapter_in_model(ProjectionEditConfig(forgotten_classes=["cat"]), model.get_base_model())
    assert_same_state(model, snapshot)
    with pytest.raises(ValueError, match="stack onto them, never replace them"):
        add_forget_adapter(model.get_base_model(), ["cat"], tokenizer, show_progress=False)
    assert_same_state(model, snapshot)


# --------------------------------------------------------------- 3: plain peft never loads part of a stack
def test_plain_peft_and_transformers_refuse_to_load_part_of_a_saved_stack(tmp_path, tokenizer, fake_hub, pixels):
    stack = add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False)
    stack.add_forget_adapter(["cat"], tokenizer=tokenizer, adapter_name="pets", show_progress=False)
    stack.save_pretrained(tmp_path)
    stack.push_to_hub("tester/stack")
    for source in (str(tmp_path), "tester/stack"):
        base = tiny_clip()
        snapshot = state_snapshot(base)
        with pytest.raises(ValueError, match="ForgetPeftModel.from_pretrained"):
            PeftModel.from_pretrained(base, source)
        with pytest.raises(ValueError, match="ForgetPeftModel.from_pretrained"):
            base.load_adapter(source)
        assert_same_state(base, snapshot)
        assert not has_forget_layers(base)
        assert forgets(ForgetPeftModel.from_pretrained(base, source), tokenizer, ["dog", "cat"], pixels)


def test_plain_peft_still_loads_a_single_adapter(tmp_path, tokenizer, pixels):
    add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False).save_pretrained(tmp_path)
    assert forgets(PeftModel.from_pretrained(tiny_clip(), tmp_path), tokenizer, ["dog"], pixels)


# ------------------------------------------------------------ 4: the standard peft entry points build the edit
def reference_features(checkpoint, tokenizer, pixels):
    return image_features(add_forget_adapter(load(checkpoint), ["dog"], tokenizer, show_progress=False), pixels)


@pytest.mark.parametrize("entry_point", ["get_peft_model", "add_adapter", "inject_adapter_in_model", "transformers"])
def test_a_config_that_names_its_classes_builds_the_edit_through_every_peft_entry_point(
    checkpoint, tokenizer, pixels, entry_point
):
    config = ProjectionEditConfig(forgotten_classes=["dog"], templates=[])  # [] = the default 80 templates
    model = load(checkpoint)
    if entry_point == "get_peft_model":
        edited = get_peft_model(model, config)
    elif entry_point == "add_adapter":
        edited = add_forget_adapter(model, ["cat"], tokenizer, show_progress=False)
        edited.add_adapter("dog", config)
        edited.set_adapter("dog")
    elif entry_point == "inject_adapter_in_model":
        edited = inject_adapter_in_model(config, model)
    else:
        model.add_adapter(config)
        edited = model
    assert torch.allclose(image_features(edited, pixels), reference_features(checkpoint, tokenizer, pixels), atol=1e-6)
    assert len(config.rank_pattern) == 0, "the caller's config is a reusable request, never filled in place"


def test_a_config_without_classes_is_refused_by_every_entry_point(checkpoint):
    model = load(checkpoint)
    snapshot = state_snapshot(model)
    for attempt in (
        lambda: get_peft_model(model, ProjectionEditConfig()),
        lambda: inject_adapter_in_model(ProjectionEditConfig(), model),
        lambda: model.add_adapter(ProjectionEditConfig()),
    ):
        with pytest.raises(ValueError, match="add_forget_adapter"):
            attempt()
        assert_same_state(model, snapshot)
        assert not has_forget_layers(model)


def test_an_adapter_whose_factors_were_never_set_cannot_run_or_merge(checkpoint, pixels):
    # a config that claims built factors (ranks) but never received them, e.g. a hand-made one
    config = ProjectionEditConfig(forgotten_classes=["dog"], rank_pattern={"visual_projection": 1})
    with pytest.raises(ValueError, match=r"`target_modules` \[\] differ from the layers its factors are for"):
        get_peft_model(load(checkpoint), config)
    config = ProjectionEditConfig(
        forgotten_classes=["dog"], target_modules=["visual_projection"], rank_pattern={"visual_projection": 1}
    )
    with pytest.raises(ValueError, match="base_fingerprints` lack"):
        get_peft_model(load(checkpoint), config)
    config.trust_unverified = True  # past the load checks, it still cannot run
    model = get_peft_model(load(checkpoint), config)
    with pytest.raises(ValueError, match="never computed"):
        image_features(model, pixels)
    with pytest.raises(ValueError, match="never computed"):
        model.merge_adapter()


# -------------------------------------------------------------------------------- 5: no-op or non-finite edits
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_tolerance": 1.0}, "rank_tolerance"),
        ({"rank_tolerance": 5.0}, "rank_tolerance"),
        ({"rank_tolerance": 0.0}, "rank_tolerance"),
        ({"method": "ccup", "ccup_lambda": 1e160}, "ccup_lambda"),
        ({"method": "ccup", "ccup_mu": float("inf")}, "ccup_mu"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
    ],
)
def test_inputs_that_would_give_a_no_op_or_non_finite_edit_are_refused(tokenizer, options, message):
    model = tiny_clip()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_forget_adapter(model, ["dog"], tokenizer, show_progress=False, **options)
    assert_same_state(model, snapshot)


def test_the_largest_accepted_ccup_weights_give_finite_logits(tokenizer, pixels):
    model = add_forget_adapter(
        tiny_clip(), ["dog"], tokenizer, method="ccup", ccup_lambda=1e8, ccup_mu=1e8, retain_classes=["cat"],
        show_progress=False,
    )  # fmt: skip
    assert torch.isfinite(image_features(model, pixels)).all()


def test_a_tokenizer_that_does_not_end_with_the_models_pooling_token_is_refused(tokenizer):
    model = tiny_clip()
    model.config.text_config.eos_token_id = 7  # the model reads its text embedding at token 7, never emitted
    with pytest.raises(ValueError, match="does not end prompts with the token id 7"):
        add_forget_adapter(model, ["dog"], tokenizer, show_progress=False)


def test_a_tokenizer_that_tokenizes_unlike_the_checkpoints_own_is_refused(checkpoint):
    model = load(checkpoint)
    snapshot = state_snapshot(model)
    shifted = tiny_tokenizer(extra_words=["aardvark", "abacus", "abbey"])  # same size class, other ids
    with pytest.raises(ValueError, match="does not tokenize like the one saved with"):
        add_forget_adapter(model, ["dog"], shifted, show_progress=False)
    assert_same_state(model, snapshot)
    add_forget_adapter(model, ["dog"], tiny_tokenizer(), show_progress=False)  # the checkpoint's own: accepted


def test_the_checkpoint_comparison_runs_the_text_tower_only_when_the_token_ids_differ(checkpoint):
    """Issue 13: the comparison is part of every first edit. The checkpoint's own tokenizer (loaded from it, or
    tokenizing the probe alike) needs no probe embedding; a tokenizer with other ids is still embedded and refused."""
    from transformers import AutoTokenizer

    from hf_clip_forget.core.prompt_cache import prompt_cache_disabled
    from hf_clip_forget.core.tokenizer_checks import check_tokenizer_matches_model

    model = load(checkpoint)
    calls = []
    model.text_model.register_forward_hook(lambda *_: calls.append(1))
    with prompt_cache_disabled():
        check_tokenizer_matches_model(model, AutoTokenizer.from_pretrained(checkpoint))  # loaded from it
        check_tokenizer_matches_model(model, tiny_tokenizer())  # another object, the same ids
        assert calls == []
        with pytest.raises(ValueError, match="does not tokenize like"):
            check_tokenizer_matches_model(model, tiny_tokenizer(extra_words=["aardvark", "abacus", "abbey"]))
    assert len(calls) == 2  # the probe through the given tokenizer and through the checkpoint's


def test_class_names_the_tokenizer_does_not_know_or_truncates_are_warned_about_by_name(tokenizer):
    with pytest.warns(UserWarning, match="'xyzzy' is mostly unknown"):
        add_forget_adapter(tiny_clip(), ["xyzzy"], tokenizer, templates="single", show_progress=False)
    long_name = " ".join(["dog"] * 70)
    with pytest.warns(UserWarning, match="truncated"):
        add_forget_adapter(tiny_clip(), [long_name], tokenizer, templates="single", show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, templates="single", show_progress=False)


# ------------------------------------------------------------------------- 6: unsupported model classes
def tiny_xclip():
    from transformers import XCLIPConfig, XCLIPModel

    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=4, num_frames=2, mit_hidden_size=32, mit_intermediate_size=37,
                  mit_num_hidden_layers=1, mit_num_attention_heads=4)  # fmt: skip
    config = XCLIPConfig(text_config=text, vision_config=vision, projection_dim=16, prompt_layers=1)
    return XCLIPModel(config).eval()


def test_a_model_whose_embedding_is_not_the_wrapped_layers_output_is_refused(tokenizer):
    model = tiny_xclip()
    snapshot = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="XCLIPModel is not supported.*CLIPModel, VisionTextDualEncoder"):
        add_forget_adapter(model, ["dog"], tokenizer, show_progress=False)
    config = ProjectionEditConfig(forgotten_classes=["dog"], target_modules=["visual_projection"])
    with pytest.raises(UnsupportedModelError, match="XCLIPModel is not supported"):
        get_peft_model(model, config)
    assert_same_state(model, snapshot)
    assert not has_forget_layers(model)


@pytest.mark.parametrize("class_name", ["CLIPModel", "MetaClip2Model", "CLIPSegModel", "Aimv2Model", "GroupViTModel"])
def test_every_family_that_reads_text_at_the_eos_id_refuses_a_tokenizer_without_it(tokenizer, class_name):
    from hf_clip_forget.testing_utils import tiny_model

    model = tiny_model(class_name)
    model.config.text_config.eos_token_id = 999  # never emitted by the tiny tokenizer
    with pytest.raises(ValueError, match="does not end prompts with the token id 999"):
        add_forget_adapter(model, ["dog"], tokenizer, templates="single", show_progress=False)


def test_a_tokenizer_with_another_start_token_is_refused(tokenizer):
    model = tiny_clip()
    model.config.text_config.bos_token_id = 5  # the tiny tokenizer starts every prompt with 2
    with pytest.raises(ValueError, match="start-of-text token is 5"):
        add_forget_adapter(model, ["dog"], tokenizer, show_progress=False)


def test_peft_entry_points_take_the_tokenizer_the_config_names_or_say_how_to_give_one(checkpoint, tokenizer, pixels):
    bare = tiny_clip()  # not loaded from a checkpoint: no tokenizer to find
    snapshot = state_snapshot(bare)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        get_peft_model(bare, ProjectionEditConfig(forgotten_classes=["dog"]))
    assert_same_state(bare, snapshot)
    named = ProjectionEditConfig(forgotten_classes=["dog"], tokenizer_name_or_path=str(checkpoint))
    edited = get_peft_model(tiny_clip(), named)
    assert forgets(edited, tokenizer, ["dog"], pixels)
    assert edited.peft_config["default"].tokenizer_name_or_path is None  # a local path is never recorded


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"method": "ccup", "alpha": 0.5}, "`alpha` is a strength of nullspace edits"),
        ({"method": "nullspace", "ccup_mu": 5.0}, "`ccup_mu` is a strength of ccup edits"),
        ({"ccup_lambda": 10.0}, "`ccup_lambda` is a strength of ccup edits"),  # a global edit: nullspace
        # a domain edit naming the other classes: logit (its default since issue 22), which ignores α
        ({"domains": ["sketch"], "retain_domains": ["photo"], "alpha": 0.3}, "method='logit'"),
        ({"domains": ["sketch"], "retain_domains": ["photo"], "method": "logit", "ccup_mu": 3.0}, "method='logit'"),
    ],
)
def test_a_strength_the_method_ignores_is_refused_not_recorded(tokenizer, options, named):
    """A CCUP edit ignores α, a nullspace edit λ and μ, a logit edit both: accepted, the config would record a
    strength that changed nothing."""
    model = tiny_clip()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=named):
        add_forget_adapter(model, ["dog"], tokenizer, retain_classes=["cat"], show_progress=False, **options)
    assert_same_state(model, snapshot)
    assert not has_forget_layers(model)
