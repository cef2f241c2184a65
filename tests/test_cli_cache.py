"""The CLI's image-feature cache is keyed on what determines the features, not on the model's or data's path."""

import json
import os

import huggingface_hub.constants
import pytest
import torch

from hf_clip_forget.cli import cached_image_features, load_dual_encoder, main
from hf_clip_forget.core import class_text_embeddings
from hf_clip_forget.evaluation import embed_images, load_labelled_images
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

from .test_cli import CLASSES, save_tiny_model, write_images


TEMPLATE = "a photo of a {}."


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A fresh HF_HOME, so that the features directory holds only this test's entries."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "hf_clip_forget" / "features"


def model_seeing_every_image_as(name: str):
    """A tiny CLIP whose vision tower outputs the same features for every image, which its projection maps onto the
    text embedding of class ``name``: it classifies every image as ``name``. Only the vision tower differs between
    two such models (the post-layernorm of the tower: weight 0, bias the chosen features)."""
    model = tiny_clip()
    text = class_text_embeddings(model, tiny_tokenizer(), CLASSES, [TEMPLATE], show_progress=False).embeddings
    features = torch.linalg.pinv(model.visual_projection.weight.detach()) @ text[CLASSES.index(name)].float()
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.zero_()
        model.vision_model.post_layernorm.bias.copy_(features)
    return model


def per_class_after(model_dir: str, data: str, out, *extra: str) -> dict:
    args = ["eval", model_dir, "--data", data, "--forget", "cat", "--templates", TEMPLATE, "--json", str(out)]
    assert main([*args, *extra]) == 0
    return json.loads(out.read_text())["after"]["per_class"]


def test_eval_sees_new_vision_weights_saved_at_the_same_path(tmp_path, cache_home):
    model_dir, data = str(tmp_path / "model"), write_images(tmp_path / "test.parquet", num_images=8)
    save_tiny_model(model_dir, model_seeing_every_image_as("cat"))
    assert per_class_after(model_dir, data, tmp_path / "1.json") == {"cat": 1.0, "dog": 0.0, "bird": 0.0, "ship": 0.0}
    save_tiny_model(model_dir, model_seeing_every_image_as("dog"))  # same path, same projections, new vision tower
    assert per_class_after(model_dir, data, tmp_path / "2.json") == {"cat": 0.0, "dog": 1.0, "bird": 0.0, "ship": 0.0}
    assert len(os.listdir(cache_home)) == 2


def test_cached_features_follow_the_processor_and_the_data_file(tmp_path, cache_home):
    model_dir, data = save_tiny_model(tmp_path / "model"), write_images(tmp_path / "test.parquet", num_images=6)
    model, _, processor = load_dual_encoder(model_dir)

    def fresh():
        dataset = load_labelled_images(data)
        return embed_images(model, dataset, processor, show_progress=False).features

    seen = [cached_image_features(model, processor, data, "test").features]
    assert torch.equal(seen[-1], fresh())
    processor = type(processor)(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})  # resize, crop
    seen.append(cached_image_features(model, processor, data, "test").features)
    assert torch.equal(seen[-1], fresh())
    write_images(data, num_images=6, seed=1)  # new images at the same path
    seen.append(cached_image_features(model, processor, data, "test").features)
    assert torch.equal(seen[-1], fresh())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert len(os.listdir(cache_home)) == 3


def test_copies_of_a_model_share_one_cache_entry(tmp_path, cache_home):
    data = write_images(tmp_path / "test.parquet", num_images=6)
    for name in ("a", "b"):
        model, _, processor = load_dual_encoder(save_tiny_model(tmp_path / name))
        cached_image_features(model, processor, data, "test")
    assert len(os.listdir(cache_home)) == 1


def test_an_unreadable_cache_entry_is_an_error_naming_it(tmp_path, cache_home, capsys):
    model_dir, data = save_tiny_model(tmp_path / "model"), write_images(tmp_path / "test.parquet", num_images=6)
    per_class_after(model_dir, data, tmp_path / "1.json")
    (entry,) = os.listdir(cache_home)
    (cache_home / entry).write_bytes(b"not safetensors")
    assert main(["eval", model_dir, "--data", data, "--forget", "cat"]) == 2
    err = capsys.readouterr().err
    assert f"error: The cached image features {str(cache_home / entry)!r} cannot be read" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------- the prompt cache and `cache`
@pytest.fixture
def caches(tmp_path, monkeypatch):
    """A fresh HF_HOME for both caches (and an empty prompt memory cache): ``(prompts folder, features folder)``."""
    from hf_clip_forget.core import prompt_cache

    home = tmp_path / "home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})
    monkeypatch.delenv(prompt_cache.PROMPT_CACHE_ENV, raising=False)
    return home / "hf_clip_forget" / "prompts", home / "hf_clip_forget" / "features"


def cached_files(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors")) if folder.exists() else []


def test_cache_info_lists_both_caches_and_clear_empties_the_one_named(tmp_path, caches, capsys):
    prompts, features = caches
    model_dir, data = save_tiny_model(tmp_path / "model"), write_images(tmp_path / "test.parquet", num_images=6)
    assert main(["cache", "info"]) == 0
    assert capsys.readouterr().out.count("0 entries") == 2
    assert (
        main(["forget", model_dir, "--classes", "cat", "--templates", TEMPLATE, "--output", str(tmp_path / "a")]) == 0
    )
    model, _, processor = load_dual_encoder(model_dir)
    cached_image_features(model, processor, data, "test")
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"prompt embeddings: {prompts}" in out and f"image features: {features}" in out
    # "a photo of a cat." alone: the tokenizer is the checkpoint's own (nothing to compare), and a global image-side
    # edit encodes no held-out paraphrases for an effect estimate (issue 13: a first edit pays only its prompts)
    assert "1 entry, 1 prompt, " in out
    assert len(cached_files(prompts)) == 1 and len(cached_files(features)) == 1
    assert main(["cache", "clear", "--prompts"]) == 0
    assert cached_files(prompts) == [] and len(cached_files(features)) == 1
    assert main(["cache", "clear"]) == 0
    assert cached_files(features) == []
    assert "removed 1 entry of image features" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # one cache or both, as argparse's usage errors: status 2
        main(["cache", "clear", "--prompts", "--features"])
    assert usage.value.code == 2


def test_no_prompt_cache_encodes_every_prompt_anew_in_any_command(tmp_path, caches):
    prompts, _ = caches
    model_dir = save_tiny_model(tmp_path / "model")
    args = ["forget", model_dir, "--classes", "cat", "--templates", TEMPLATE, "--output"]
    assert main(["--no-prompt-cache", *args, str(tmp_path / "a")]) == 0
    assert cached_files(prompts) == []
    assert main([*args, str(tmp_path / "b")]) == 0
    assert len(cached_files(prompts)) == 1
