"""Vision towers that transformers does not ship, as native transformers models.

Layer ``models``: imports only torch, transformers and its own submodules. Importing it registers the models with
transformers' ``Auto`` classes, so that ``AutoModel.from_pretrained`` (and ``VisionTextDualEncoderModel`` with one of
these towers) can load them.

* :mod:`.efficientnet_lite` — EfficientNet-Lite, with the pretrained EfficientNet-Lite0 ImageNet weights.
* :mod:`.mean_pooled_bert` — a BERT text tower whose pooled output is the mean-pooled sentence embedding.
* :mod:`.demo` — the embedded default dual encoder assembled from both (``load_demo_model``).
"""

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


register_efficientnet_lite()
register_mean_pooled_bert()

__all__ = [
    "IMAGE_CROP_PCT",
    "IMAGE_INTERPOLATION",
    "IMAGE_MEAN",
    "IMAGE_SIZE",
    "IMAGE_STD",
    "EfficientNetLiteConfig",
    "EfficientNetLiteForImageClassification",
    "EfficientNetLiteModel",
    "EfficientNetLitePreTrainedModel",
    "MeanPooledBertConfig",
    "MeanPooledBertModel",
    "load_packaged_efficientnet_lite0_weights",
    "register_efficientnet_lite",
    "register_mean_pooled_bert",
]
