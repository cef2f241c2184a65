"""Audio–text models (CLAP): forgetting a sound by name removes it from the audio embeddings, exactly; sound
templates by default; both projection MLPs' last Linear (with bias) merge, unmerge bit for bit, save and stack."""

import torch

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.core import SOUND_TEMPLATES
from hf_clip_forget.testing_utils import tiny_audio_inputs, tiny_model

from .conftest import class_embeddings, features, max_abs_cos, state_snapshot


CLASS = "ClapModel"


def audio_embeddings(model) -> torch.Tensor:
    with torch.no_grad():
        return features(model.get_audio_features(**tiny_audio_inputs()))


def forward(model, tokenizer, prompts=("the sound of a dog.", "the sound of a cat.")):
    inputs = tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **tiny_audio_inputs())


def forget(model, tokenizer, classes=("dog",), **options):
    return model.add_forget_adapter(list(classes), tokenizer=tokenizer, show_progress=False, **options)


def test_a_forgotten_sound_leaves_every_audio_embedding_with_sound_templates_by_default(tokenizer):
    base = tiny_model(CLASS)
    directions = class_embeddings(base, tokenizer, ["dog"], templates=SOUND_TEMPLATES)
    assert max_abs_cos(audio_embeddings(base), directions) > 1e-3
    model = forget(base, tokenizer)
    assert model.peft_config["default"].templates == list(SOUND_TEMPLATES)
    assert model.peft_config["default"].target_modules == {"audio_projection.linear2"}
    assert max_abs_cos(audio_embeddings(model), directions) <= 1e-5
    assert max_abs_cos(forward(model, tokenizer).audio_embeds, directions) <= 1e-5


def test_half_alpha_halves_the_audio_component_before_normalisation(tokenizer):
    base = tiny_model(CLASS)
    direction = class_embeddings(base, tokenizer, ["dog"], templates=SOUND_TEMPLATES)[0]
    before = audio_embeddings(base)  # CLAP returns L2-normalised embeddings: the edit acts before that
    after = audio_embeddings(forget(base, tokenizer, alpha=0.5))
    halved = before - 0.5 * (before @ direction)[:, None] * direction
    expected = torch.nn.functional.normalize(halved, dim=-1)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert (before @ direction).abs().max() > 1e-3


def test_audio_and_text_edits_merge_and_unmerge_bit_for_bit_biases_included(tokenizer, tmp_path):
    base = tiny_model(CLASS)
    snapshot = state_snapshot(base)
    model = forget(base, tokenizer, target="both", retain_classes=["cat"])
    unmerged = forward(model, tokenizer).logits_per_audio
    model.merge_adapter()
    torch.testing.assert_close(forward(model, tokenizer).logits_per_audio, unmerged, atol=1e-5, rtol=1e-5)
    state = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    changed = {name for name, value in snapshot.items() if not torch.equal(state[name], value)}
    assert changed == {f"{side}_projection.linear2.{p}" for side in ("audio", "text") for p in ("weight", "bias")}
    model.unmerge_adapter()
    state = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    assert all(torch.equal(state[name], value) for name, value in snapshot.items())
    model.save_pretrained(tmp_path)
    reloaded = ForgetPeftModel.from_pretrained(tiny_model(CLASS), tmp_path)
    assert torch.equal(forward(reloaded, tokenizer).logits_per_audio, unmerged)


def test_stacked_sounds_are_all_removed(tokenizer):
    base = tiny_model(CLASS)
    directions = class_embeddings(base, tokenizer, ["dog", "cat"], templates=SOUND_TEMPLATES)
    model = forget(base, tokenizer, ["dog"])
    forget(model, tokenizer, ["cat"], adapter_name="cats")
    assert max_abs_cos(audio_embeddings(model), directions) <= 1e-5
