"""A pushed repo is usable as pushed and says what it may be used for (issue 10, item 13): a merged push carries the
tokenizer and image processor (``pipeline`` works on it), cards carry a ``license``, nothing names a local path of
the uploader's machine, and ``import hf_clip_forget`` registers the demo model's towers."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers import pipeline as transformers_pipeline

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.models import EfficientNetLiteConfig, MeanPooledBertConfig
from hf_clip_forget.testing_utils import tiny_clip, tiny_image_processor, tiny_tokenizer


LABELS = ["cat", "dog", "truck", "bird"]
TEMPLATE = "a photo of a {}."


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((48, 40, 3)) * 255).astype("uint8"))


def edited(base, tokenizer):
    return base.add_forget_adapter(["cat", "dog"], tokenizer=tokenizer, show_progress=False)


def direct_scores(model, tokenizer, image_processor, image) -> dict[str, float]:
    """Zero-shot probabilities computed from the model itself, as the pipeline is meant to compute them."""
    texts = tokenizer([TEMPLATE.format(label) for label in LABELS], padding=True, return_tensors="pt")
    pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], pixel_values=pixels)
    return dict(zip(LABELS, logits.logits_per_image.softmax(-1)[0].tolist(), strict=True))


def pipeline_scores(repo_id: str, image) -> dict[str, float]:
    classifier = transformers_pipeline("zero-shot-image-classification", model=repo_id)
    return {r["label"]: r["score"] for r in classifier(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)}


def saved_checkpoint(directory, card: str | None = None) -> CLIPModel:
    """A tiny CLIP loaded from a local checkpoint directory holding its tokenizer and image processor."""
    tiny_clip().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    tiny_image_processor().save_pretrained(directory)
    if card is not None:
        (directory / "README.md").write_text(card)
    return CLIPModel.from_pretrained(directory).eval()


def pushed_text(fake_hub, repo_id: str) -> str:
    return "\n".join(
        data.decode("utf-8", "replace")
        for name, data in fake_hub.repos[repo_id].items()
        if not name.endswith(".safetensors")
    )


# ------------------------------------------------------------------------------------------------ merged pushes
def test_a_merged_push_works_with_pipeline_and_gives_the_models_scores(fake_hub, tokenizer):
    model = edited(tiny_clip(), tokenizer)
    image_processor = tiny_image_processor()
    model.push_to_hub("tester/merged-pipeline", merged=True, tokenizer=tokenizer, image_processor=image_processor)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(
        fake_hub.repos["tester/merged-pipeline"]
    )
    image = photo()
    scores = pipeline_scores("tester/merged-pipeline", image)
    expected = direct_scores(model.get_base_model(), tokenizer, image_processor, image)  # adapters active
    assert scores == pytest.approx(expected, abs=1e-5)
    unedited = direct_scores(tiny_clip(), tokenizer, image_processor, image)
    assert scores != pytest.approx(unedited, abs=1e-3)  # the edit is in the pushed weights


def test_a_merged_push_takes_tokenizer_and_image_processor_from_the_base_checkpoint(fake_hub, tokenizer, tmp_path):
    base = saved_checkpoint(tmp_path / "base")
    edited(base, tokenizer).push_to_hub("tester/merged-from-checkpoint", merged=True)
    files = fake_hub.repos["tester/merged-from-checkpoint"]
    assert files["tokenizer.json"] == (tmp_path / "base" / "tokenizer.json").read_bytes()
    assert json.loads(files["preprocessor_config.json"])["crop_size"] == {"height": 32, "width": 32}


def test_a_merged_push_without_tokenizer_or_image_processor_is_refused_before_anything_is_sent(fake_hub, tokenizer):
    model = edited(tiny_clip(), tokenizer)  # built from a config: no checkpoint to take them from
    with pytest.raises(ValueError, match="merged upload includes the tokenizer.*Pass `tokenizer=`.*Nothing was"):
        model.push_to_hub("tester/merged-unusable", merged=True)
    with pytest.raises(ValueError, match="Pass `image_processor=`"):
        model.push_to_hub("tester/merged-unusable", merged=True, tokenizer=tokenizer)
    assert "tester/merged-unusable" not in fake_hub.repos


def test_preprocessors_given_for_an_adapter_push_are_refused(fake_hub, tokenizer):
    with pytest.raises(ValueError, match="saved only with a merged model"):
        edited(tiny_clip(), tokenizer).push_to_hub("tester/adapter-with-tokenizer", tokenizer=tokenizer)
    assert "tester/adapter-with-tokenizer" not in fake_hub.repos


def test_the_merged_cards_usage_code_runs(fake_hub, tokenizer, tmp_path, monkeypatch):
    model = edited(tiny_clip(), tokenizer)
    model.push_to_hub("tester/merged-usage", merged=True, tokenizer=tokenizer, image_processor=tiny_image_processor())
    usage = ModelCard.load("tester/merged-usage").text.split("## How to use")[1].split("## ")[0]
    blocks = [block.split("```")[0] for block in usage.split("```python")[1:]]
    assert len(blocks) == 2 and "import hf_clip_forget" not in usage  # a CLIPModel needs nothing of ours
    monkeypatch.chdir(tmp_path)
    photo().save("photo.jpg")
    namespace = {}
    for block in blocks:
        exec(block, namespace)  # noqa: S102 - the card's own snippets, on the tiny model
    assert sorted(score["label"] for score in namespace["scores"]) == ["cat", "dog", "truck"]
    assert isinstance(namespace["model"], CLIPModel) and namespace["tokenizer"]("a cat")["input_ids"]
    assert namespace["image_processor"](photo(), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_a_merged_card_without_tokenizer_does_not_claim_pipeline_usage(tokenizer, tmp_path):
    edited(tiny_clip(), tokenizer).save_merged_pretrained(tmp_path)
    usage = ModelCard.load(tmp_path / "README.md").text.split("## How to use")[1].split("## ")[0]
    assert "pipeline(" not in usage and "without a tokenizer or image processor" in usage


def tiny_demo_like_model() -> VisionTextDualEncoderModel:
    """A dual encoder with this package's tower classes (EfficientNet-Lite, mean-pooled BERT), as the demo model."""
    torch.manual_seed(0)
    vision = EfficientNetLiteConfig(
        image_size=32, stem_channels=8, kernel_sizes=[3], out_channels=[8], strides=[1], num_block_repeats=[1],
        expand_ratios=[1], hidden_size=16,
    )  # fmt: skip
    text = MeanPooledBertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    return VisionTextDualEncoderModel(config=config).eval()


def test_the_merged_card_of_a_model_with_our_towers_imports_the_package_and_works(fake_hub, tokenizer):
    model = edited(tiny_demo_like_model(), tokenizer)
    image_processor = tiny_image_processor()
    model.push_to_hub("tester/demo-like", merged=True, tokenizer=tokenizer, image_processor=image_processor)
    usage = ModelCard.load("tester/demo-like").text.split("## How to use")[1].split("## ")[0]
    assert usage.count("import hf_clip_forget  # registers this model's tower classes") == 2
    image = photo(1)
    expected = direct_scores(model.get_base_model(), tokenizer, image_processor, image)
    assert pipeline_scores("tester/demo-like", image) == pytest.approx(expected, abs=1e-5)


def test_importing_the_package_registers_the_demo_towers():
    code = (
        "import hf_clip_forget\n"
        "from transformers import AutoConfig\n"
        "print(AutoConfig.for_model('efficientnet_lite').model_type, AutoConfig.for_model('bert_mean_pooled').model_type)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["efficientnet_lite", "bert_mean_pooled"]


# ------------------------------------------------------------------------------------------------ local paths
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_no_pushed_file_names_the_local_directory_of_the_base_model(fake_hub, tokenizer, tmp_path, merged):
    base = saved_checkpoint(tmp_path / "private-models" / "clip")
    repo_id = f"tester/no-local-paths-{'merged' if merged else 'adapter'}"
    edited(base, tokenizer).push_to_hub(repo_id, merged=merged)
    assert "private-models" not in pushed_text(fake_hub, repo_id)
    assert "base_model" not in card_data(repo_id)  # not a Hub model: no id, no link
    if not merged:
        config = json.loads(fake_hub.repos[repo_id]["adapter_config.json"])
        assert config["base_model_name_or_path"] is None


def test_a_hub_id_of_the_base_model_is_kept(fake_hub, tokenizer):
    base = tiny_clip()
    base.name_or_path = "openai/clip-vit-base-patch32"
    edited(base, tokenizer).push_to_hub("tester/hub-base-kept")
    config = json.loads(fake_hub.repos["tester/hub-base-kept"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == "openai/clip-vit-base-patch32"


# ------------------------------------------------------------------------------------------------ licenses
def hub_base(fake_hub, repo_id: str, front_matter: str):
    """A base model repo on the loopback Hub whose card has ``front_matter``; a tiny CLIP 'loaded' from it."""
    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_file(path_or_fileobj=f"---\n{front_matter}\n---\n# base\n".encode(), path_in_repo="README.md",
                    repo_id=repo_id)  # fmt: skip
    base = tiny_clip()
    base.name_or_path = repo_id
    return base


def card_data(repo_id: str) -> dict:
    return ModelCard.load(repo_id).data.to_dict()


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_the_card_carries_the_base_models_license(fake_hub, tokenizer, merged):
    suffix = "merged" if merged else "adapter"
    base = hub_base(fake_hub, f"base-owner/mit-base-{suffix}", "license: mit")
    options = dict(merged=True, tokenizer=tokenizer, image_processor=tiny_image_processor()) if merged else {}
    edited(base, tokenizer).push_to_hub(f"tester/licensed-{suffix}", **options)
    assert card_data(f"tester/licensed-{suffix}")["license"] == "mit"
    assert "| license | `mit` (the base model's) |" in ModelCard.load(f"tester/licensed-{suffix}").text


def test_an_other_license_keeps_its_name_and_link(fake_hub, tokenizer):
    front = "license: other\nlicense_name: custom-model-license\nlicense_link: https://example.com/license"
    edited(hub_base(fake_hub, "base-owner/other-base", front), tokenizer).push_to_hub("tester/other-license")
    data = card_data("tester/other-license")
    assert (data["license"], data["license_name"]) == ("other", "custom-model-license")
    assert data["license_link"] == "https://example.com/license"


def test_a_license_given_by_the_uploader_wins(fake_hub, tokenizer):
    base = hub_base(fake_hub, "base-owner/mit-base-overridden", "license: mit")
    edited(base, tokenizer).push_to_hub("tester/given-license", license="apache-2.0")
    assert card_data("tester/given-license")["license"] == "apache-2.0"


def test_an_unknown_base_license_is_written_as_unknown(fake_hub, tokenizer):
    edited(tiny_clip(), tokenizer).push_to_hub("tester/unknown-license")
    assert card_data("tester/unknown-license")["license"] == "unknown"
    assert "| license | unknown: the base model's license could not be determined |" in (
        ModelCard.load("tester/unknown-license").text
    )


def test_an_invalid_license_is_refused_before_anything_is_sent(fake_hub, tokenizer):
    with pytest.raises(ValueError, match="Invalid license 'MIT License'"):
        edited(tiny_clip(), tokenizer).push_to_hub("tester/invalid-license", license="MIT License")
    assert "tester/invalid-license" not in fake_hub.repos


def test_a_local_save_reads_the_license_from_the_base_checkpoints_card(tokenizer, tmp_path):
    base = saved_checkpoint(tmp_path / "base", card="---\nlicense: other\nlicense_name: demo-license\n---\n# demo\n")
    edited(base, tokenizer).save_pretrained(tmp_path / "adapter")
    data = ModelCard.load(tmp_path / "adapter" / "README.md").data.to_dict()
    assert (data["license"], data["license_name"]) == ("other", "demo-license")


def test_a_forget_adapter_made_without_a_tokenizer_pushes_merged_with_the_given_processor(fake_hub):
    from transformers import CLIPProcessor

    directions = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    model = add_forget_adapter(tiny_clip(), ["cat", "dog"], text_embeds=directions)
    processor = CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer())
    model.push_to_hub("tester/merged-processor", merged=True, processor=processor)
    assert {"tokenizer.json", "processor_config.json"} <= set(fake_hub.repos["tester/merged-processor"])
    assert AutoImageProcessor.from_pretrained("tester/merged-processor").crop_size == {"height": 32, "width": 32}
    assert pipeline_scores("tester/merged-processor", photo())  # loads and runs
