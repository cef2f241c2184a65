"""Tiny, randomly initialised dual encoders and a word-level tokenizer, built offline.

They exercise the mechanics of forget adapters (exactness, shapes, round trips) in tests and examples; being
random, they say nothing about how well forgetting works on real images. The tiny OWL-ViT and OWLv2 models need
``tiny_tokenizer(class_words_last=True)`` (:func:`tiny_model` says why).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .core.templates import IMAGENET_TEMPLATES


SPECIAL_TOKENS = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
#: Class names the default tiny vocabulary knows (CIFAR-10, PACS and a few more).
TINY_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "elephant",
    "giraffe", "guitar", "house", "person", "car", "tree", "flower", "fish", "boat", "chair", "lamp", "apple",
    "bicycle", "rocket", "sketch", "painting", "cartoon", "art",
)  # fmt: skip
TINY_VOCAB_SIZE = 1000


def tiny_tokenizer(extra_words: Iterable[str] = (), class_words_last: bool = False):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` whose vocabulary holds the ImageNet template words,
    :data:`TINY_CLASS_NAMES` and ``extra_words``; it wraps every text as ``[BOS] … [EOS]``.

    Ids: the special tokens (:data:`SPECIAL_TOKENS`), then every word in alphabetical order; with
    ``class_words_last=True``, the template words first and the class names and ``extra_words`` after them, so that
    a class name has the largest id of its prompt. **Use that for the tiny OWL-ViT and OWLv2 models**
    (``tiny_model("OwlViTForObjectDetection")`` …): they read a prompt's text embedding at its largest token id
    (the end-of-text token of their real tokenizers), which in alphabetical order is a template word for every class
    sorting before it ("photo" in "a photo of a dog."), so that dog, cat and horse embed alike and an edit refuses
    them ("A forget embedding is parallel to the direction all classes share"). The default order is kept for the
    other models, whose tests were written against its ids.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Whitespace()
    template_words = set()
    for template in IMAGENET_TEMPLATES:
        template_words.update(
            token for token, _ in pre_tokenizer.pre_tokenize_str(template.replace("{}", " ").lower())
        )
    class_words = (set(TINY_CLASS_NAMES) | {w.lower() for w in extra_words}) - template_words
    if class_words_last:
        words = [*sorted(template_words), *sorted(class_words)]
    else:
        words = sorted(template_words | class_words)
    vocab = dict(SPECIAL_TOKENS)
    for word in words:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > TINY_VOCAB_SIZE:
        raise ValueError(f"The tiny vocabulary is limited to {TINY_VOCAB_SIZE} tokens, got {len(vocab)}.")
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=64,
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_clip(
    seed: int = 0, projection_dim: int = 16, dtype: torch.dtype = torch.float32, vocab_size: int = TINY_VOCAB_SIZE
):
    """A randomly initialised 2+2-layer ``CLIPModel`` (hidden 32, 32×32 images) in eval mode."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_channels=3,
        ),
        projection_dim=projection_dim,
    )  # fmt: skip
    return CLIPModel(config).to(dtype).eval()


def tiny_dual_encoder(seed: int = 0, projection_dim: int = 16, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``VisionTextDualEncoderModel`` (tiny CLIP vision tower + tiny BERT) in eval mode."""
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    text = BertConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=projection_dim)
    return VisionTextDualEncoderModel(config=config).to(dtype).eval()


def tiny_image_processor():
    """A CLIP image processor for the tiny models' 32×32 images."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def random_pixels(batch_size: int = 4, image_size: int = 32, seed: int = 1) -> torch.Tensor:
    """Seeded random ``pixel_values`` for the tiny models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


# One tiny random config per supported model class besides CLIPModel and VisionTextDualEncoderModel: the transformers
# config class and its arguments. Text towers fit tiny_tokenizer (vocab 1000, [PAD]/[BOS]/[EOS] = 0/2/3, 64
# positions), images are 32×32 and every joint embedding has 16 dimensions.
_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
# BERT-style towers read token 0 ([BOS]), which at the default init scale is nearly one vector for every prompt
_BERT_TEXT = dict(_TEXT, initializer_range=0.5)
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4)  # fmt: skip
# fmt: off
_TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "MetaClip2Model": ("MetaClip2Config", dict(text_config=_TEXT, vision_config=_VISION)),
    "CLIPSegModel": ("CLIPSegConfig", dict(text_config=_TEXT, vision_config=_VISION)),
    # RoBERTa positions start after the padding id; the text tower maps hidden 32 to project_dim 24 first
    "AltCLIPModel": ("AltCLIPConfig", dict(text_config=dict(_BERT_TEXT, max_position_embeddings=66, project_dim=24),
                                           vision_config=_VISION)),
    "ChineseCLIPModel": ("ChineseCLIPConfig", dict(text_config=_BERT_TEXT, vision_config=_VISION)),
    # the attention-pooling head gives the image embedding
    "Aimv2Model": ("Aimv2Config", dict(text_config=_TEXT, vision_config=dict(_VISION, use_head=True))),
    "BlipModel": ("BlipConfig", dict(text_config=dict(_BERT_TEXT, encoder_hidden_size=32, sep_token_id=3),
                                     vision_config=_VISION, image_text_hidden_size=12)),
    # OWL pools text at the largest token id (CLIP's EOS in real checkpoints): with tiny_tokenizer(class_words_last=
    # True) that is the class name; in the default alphabetical order, a template word every class sharing it reads
    "OwlViTModel": ("OwlViTConfig", dict(text_config=_TEXT, vision_config=_VISION)),
    "Owlv2Model": ("Owlv2Config", dict(text_config=_TEXT, vision_config=_VISION)),
    # detection: box class embeddings (class_head.dense0) live in the text tower's width, as in the released models
    "OwlViTForObjectDetection": ("OwlViTConfig", dict(text_config=_TEXT, vision_config=_VISION, projection_dim=32)),
    "Owlv2ForObjectDetection": ("Owlv2Config", dict(text_config=_TEXT, vision_config=_VISION, projection_dim=32)),
    # the image embedding is the attention-pooling head's output; text is read at the last of 64 padded positions
    "SiglipModel": ("SiglipConfig", dict(text_config=_TEXT, vision_config=_VISION)),
    # audio: a two-stage HTSAT on 16 mel bins; RoBERTa text read at token 0, its positions after the padding id
    "ClapModel": ("ClapConfig", dict(
        text_config=dict(_BERT_TEXT, max_position_embeddings=66),
        audio_config=dict(patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=16,
                          spec_size=64, num_mel_bins=16, window_size=4, enable_fusion=False),
    )),
    # projections are Sequential(Linear, BatchNorm1d, ReLU, Linear), hence eval mode
    "GroupViTModel": ("GroupViTConfig", dict(
        text_config=_TEXT, projection_intermediate_dim=24,
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=3, depths=[1, 1, 1], num_group_tokens=[4, 2, 0],
                           num_output_groups=[4, 2, 2]),
    )),
    # a two-stage EfficientNet (32×32 → 4×4 map of 16 channels, average-pooled into the image embedding, so no
    # projection); BERT text read at token 0. BatchNorm throughout, hence eval mode; at the default init scale the
    # untrained convolutions shrink images to embeddings of norm ~1e-9, at 0.4 they have norm ~1
    "AlignModel": ("AlignConfig", dict(
        text_config=_BERT_TEXT,
        vision_config=dict(image_size=32, width_coefficient=0.5, depth_coefficient=1.0, in_channels=[32, 32],
                           out_channels=[32, 32], kernel_sizes=[3, 3], strides=[2, 2], num_block_repeats=[1, 1],
                           expand_ratios=[1, 2], hidden_dim=64, initializer_range=0.4),
    )),
    # as SigLIP, on pre-cut 8×8 patches (at most 16 per image: see tiny_pixel_inputs)
    "Siglip2Model": ("Siglip2Config", dict(text_config=_TEXT, vision_config=dict(_VISION, num_patches=16))),
    # BERT-style text (no bos/eos fields) and a ViT, both read at token 0; the multimodal encoder and the image
    # codebook (masked-image targets, FlavaForPreTraining only) are unused by the joint embeddings, but tiny too
    "FlavaModel": ("FlavaConfig", dict(
        text_config={k: v for k, v in _BERT_TEXT.items() if k not in ("bos_token_id", "eos_token_id")},
        image_config=dict(_VISION, vocab_size=16),
        multimodal_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        image_codebook_config=dict(hidden_size=8, num_groups=2, num_blocks_per_group=1, vocab_size=16),
        hidden_size=32,
    )),
    # the joint layers' width is image_text_hidden_size (projection_dim is BlipModel's)
    "BlipForImageTextRetrieval": ("BlipConfig", dict(
        text_config=dict(_BERT_TEXT, encoder_hidden_size=32, sep_token_id=3), vision_config=_VISION,
        image_text_hidden_size=16,
    )),
}
# fmt: on
#: Every model class :func:`tiny_model` builds.
TINY_MODEL_CLASSES: tuple[str, ...] = ("CLIPModel", "VisionTextDualEncoderModel", *_TINY_CONFIGS)


def tiny_model(class_name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny ``class_name`` (one of :data:`TINY_MODEL_CLASSES`) in eval mode, fitting
    :func:`tiny_tokenizer` and 32×32 images (SigLIP 2: their 8×8 patches, :func:`tiny_pixel_inputs`), with
    16-dimensional joint embeddings (SigLIP and SigLIP 2: 32, their hidden size).

    OWL-ViT and OWLv2 (``OwlViTModel``, ``Owlv2Model``, ``OwlViTForObjectDetection``,
    ``Owlv2ForObjectDetection``) read a prompt's text embedding at its largest token id: pair them with
    ``tiny_tokenizer(class_words_last=True)`` and class names it knows (:data:`TINY_CLASS_NAMES`, or others passed
    as its ``extra_words``; an unknown word is ``[UNK]``). With the default tokenizer, every class sorting before
    the template words ("dog" < "photo") embeds alike, and an edit refuses them with "A forget embedding is
    parallel to the direction all classes share"::

        model = tiny_model("OwlViTForObjectDetection")
        tokenizer = tiny_tokenizer(class_words_last=True)
        model.add_forget_adapter(["dog"], tokenizer=tokenizer, retain_classes=["cat", "horse"])
    """
    if class_name == "CLIPModel":
        return tiny_clip(seed, dtype=dtype)
    if class_name == "VisionTextDualEncoderModel":
        return tiny_dual_encoder(seed, dtype=dtype)
    if class_name not in _TINY_CONFIGS:
        raise ValueError(f"No tiny {class_name}; choose one of {TINY_MODEL_CLASSES}.")
    import transformers

    config_name, arguments = _TINY_CONFIGS[class_name]
    config = getattr(transformers, config_name)(**{"projection_dim": 16, **arguments})
    if class_name == "Aimv2Model":  # under SDPA an unpadded text batch is attended bidirectionally (transformers 5)
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config)
    with torch.no_grad():  # initialisation zeroes biases; trained ones (GroupViT's projection's, say) are not
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.02)
    return model.to(dtype).eval()


def tiny_pixel_inputs(class_name: str, batch_size: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``class_name``'s ``get_image_features`` for ``batch_size`` seeded random images of
    its tiny model: 32×32 ``pixel_values``, or for ``Siglip2Model`` :func:`tiny_siglip2_pixel_inputs`."""
    if class_name not in TINY_MODEL_CLASSES:
        raise ValueError(f"No tiny {class_name}; choose one of {TINY_MODEL_CLASSES}.")
    if class_name == "Siglip2Model":
        return tiny_siglip2_pixel_inputs(batch_size, seed)
    return {"pixel_values": random_pixels(batch_size, 32, seed)}


#: Patch grids of the tiny SigLIP 2 images, in turn: one square image and two of other aspect ratios, padded.
_SIGLIP2_GRIDS = ((4, 4), (3, 5), (2, 6))


def tiny_siglip2_pixel_inputs(batch_size: int = 4, seed: int = 1, max_patches: int = 16) -> dict[str, torch.Tensor]:
    """Seeded random SigLIP 2 image inputs, laid out as its processor lays them out: ``pixel_values``
    ``(batch, max_patches, 3·8·8)`` of flattened 8×8 patches, zero past each image's own patches;
    ``pixel_attention_mask`` ``(batch, max_patches)`` marking the real ones; ``spatial_shapes`` ``(batch, 2)``,
    each image's patch grid (cycling through :data:`_SIGLIP2_GRIDS`, so that padding and resized position
    embeddings are exercised)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(batch_size, max_patches, 3 * 8 * 8)
    mask = torch.zeros(batch_size, max_patches, dtype=torch.int32)
    shapes = torch.tensor([_SIGLIP2_GRIDS[i % len(_SIGLIP2_GRIDS)] for i in range(batch_size)], dtype=torch.long)
    for i, (height, width) in enumerate(shapes.tolist()):
        pixel_values[i, : height * width] = torch.randn(height * width, 3 * 8 * 8, generator=generator)
        mask[i, : height * width] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def tiny_audio_inputs(batch_size: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """The keyword arguments of the tiny ``ClapModel``'s ``get_audio_features``: seeded random 16-bin log-mel
    features of 201 frames (one channel: the model is not fused)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_features": torch.randn(batch_size, 1, 201, 16, generator=generator),
        "is_longer": torch.zeros(batch_size, 1, dtype=torch.bool),
    }
