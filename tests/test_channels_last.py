"""The harness runs a convolutional image tower channels-last on the CPU (issue 13): the same features to float
rounding, every weight its original tensor afterwards, ViT towers untouched."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

from hf_clip_forget.evaluation import embed_images, pre_projection_features
from hf_clip_forget.evaluation.features import channels_last_on_cpu
from hf_clip_forget.models.efficientnet_lite import EfficientNetLiteConfig, register_efficientnet_lite
from hf_clip_forget.testing_utils import tiny_dual_encoder, tiny_image_processor


def convolutional_dual_encoder() -> VisionTextDualEncoderModel:
    """A tiny random EfficientNet-Lite + BERT dual encoder (the demo model's architecture, small)."""
    register_efficientnet_lite()
    torch.manual_seed(0)
    vision = EfficientNetLiteConfig(
        kernel_sizes=[3, 5], out_channels=[8, 16], strides=[1, 2], num_block_repeats=[1, 2], expand_ratios=[1, 4],
        stem_channels=8, hidden_size=24,
    )  # fmt: skip
    text = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=8)
    return VisionTextDualEncoderModel(config).eval()


def labelled_images(count: int = 6) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(count)]}, features=features)


def test_a_convolutional_tower_is_embedded_channels_last_with_the_same_features_and_weights_restored():
    model = convolutional_dual_encoder()
    weights = {name: (p, p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    data = labelled_images()
    layouts = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_pre_hook(
        lambda module, args: layouts.append(
            (args[0].is_contiguous(memory_format=torch.channels_last),
             module.weight.is_contiguous(memory_format=torch.channels_last))
        )
    )  # fmt: skip
    found = embed_images(model, data, tiny_image_processor(), batch_size=4, show_progress=False)
    handle.remove()
    assert layouts and all(inputs and weight for inputs, weight in layouts)  # it did run channels-last
    for name, (parameter, pointer, stride) in weights.items():  # the very same storage, in its original layout
        assert dict(model.named_parameters())[name] is parameter
        assert (parameter.data_ptr(), parameter.stride()) == (pointer, stride) and parameter.is_contiguous()
    pixels = tiny_image_processor()(images=list(data["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = pre_projection_features(model, pixel_values=pixels)
    error = ((found.features - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert error <= 1e-5


def test_a_vit_tower_and_an_accelerator_device_are_left_as_they_are():
    model = tiny_dual_encoder()
    with channels_last_on_cpu(model, torch.device("cpu")) as applied:
        assert not applied
    conv = convolutional_dual_encoder()
    with channels_last_on_cpu(conv, torch.device("cuda")) as applied:
        assert not applied
    assert all(p.is_contiguous() for p in conv.parameters())


def test_weights_are_restored_when_the_embedding_fails():
    model = convolutional_dual_encoder()
    before = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    try:
        with channels_last_on_cpu(model, torch.device("cpu")) as applied:
            assert applied
            raise RuntimeError("interrupted")
    except RuntimeError:
        pass
    assert all((p.data_ptr(), p.stride()) == before[name] for name, p in model.named_parameters())
