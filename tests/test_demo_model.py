"""The embedded default model: assembled offline from PyPI packages, reloadable, and forgetting works on real images."""

import json

import torch
from transformers import AutoModel, VisionTextDualEncoderModel

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.models.demo import demo_model_path, load_demo_model

from .conftest import image_features


def test_the_demo_model_is_a_reloadable_dual_encoder():
    model, processor = load_demo_model()
    assert isinstance(model, VisionTextDualEncoderModel)
    assert model.visual_projection.weight.shape == (256, 1280) and model.text_projection.weight.shape == (256, 384)
    reloaded = AutoModel.from_pretrained(demo_model_path()).eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_features(model, pixels), image_features(reloaded, pixels))
    card = open(f"{demo_model_path()}/README.md").read()
    assert "not CLIP" in card


def test_the_demo_forgets_dogs_on_real_photos_and_keeps_the_rest(capsys):
    assert main(["demo", "--classes", "dog"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.endswith(".jpg") or ".jpg " in line]
    dogs = [row for row in rows if row[1] == "dog"]
    others = [row for row in rows if row[1] != "dog"]
    assert len(dogs) == 2 and len(others) == 12
    assert all(row[2] == "dog" for row in dogs) and all(row[3] != "dog" for row in dogs)  # recognised, then not
    assert sum(row[2] == row[3] for row in others) >= 11  # the other predictions stay (almost) all the same


def test_forgetting_through_the_api_on_the_demo_model_removes_the_class_direction():
    model, processor = load_demo_model()
    from hf_clip_forget.core import IMAGENET_TEMPLATES, class_text_embeddings

    directions = class_text_embeddings(model, processor.tokenizer, ["dog"], IMAGENET_TEMPLATES, show_progress=False)
    edited = add_forget_adapter(model, ["dog"], processor.tokenizer, show_progress=False)
    from importlib import resources

    from PIL import Image

    folder = resources.files("hf_clip_forget").joinpath("demo_images")
    files = [entry["file"] for entry in json.loads(folder.joinpath("images.json").read_text())]
    images = [Image.open(folder.joinpath(name)).convert("RGB") for name in files]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    feats = torch.nn.functional.normalize(image_features(edited, pixels), dim=-1)
    assert (feats @ directions.embeddings.float().T).abs().max() <= 1e-5
