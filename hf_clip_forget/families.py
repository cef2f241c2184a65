"""Which dual encoders forget adapters support, and where their joint embeddings come from: the one place that
holds model-specific knowledge.

A forget adapter edits the layer whose *output is* the joint embedding (``W' = M W``), so that every image (or text)
embedding becomes ``M`` times the original. That is exact only when nothing follows the wrapped layer before the
embedding is compared with the other side. Model classes are therefore listed here explicitly, after checking that
property; any other class is refused with :class:`UnsupportedModelError` rather than edited inexactly (e.g.
``XCLIPModel``: a multi-frame transformer follows ``visual_projection``).

Layer 1: imports nothing from this package; transformers only by class name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DualEncoderFamily:
    """A family of contrastive dual encoders whose joint embeddings are outputs of bias-free ``nn.Linear`` layers.

    Attributes:
        name: a short name for messages and docs.
        model_classes: transformers class names of the family (``type(model).__name__``).
        image_projection: module path whose output is the image embedding.
        text_projection: module path whose output is the text embedding.
        text_pooled_at_eos_token: the text embedding is read at the tokenizer's end-of-text token, whose id the
            model config names (``text_config.eos_token_id``; CLIP's legacy id 2 means "the largest id"), so a
            tokenizer that does not emit that id gives embeddings of the wrong token.
    """

    name: str
    model_classes: tuple[str, ...]
    image_projection: str = "visual_projection"
    text_projection: str = "text_projection"
    text_pooled_at_eos_token: bool = False

    @property
    def projections(self) -> dict[str, str]:
        """``{"visual": image projection path, "text": text projection path}``."""
        return {"visual": self.image_projection, "text": self.text_projection}


#: Every supported family. ``VisionTextDualEncoderModel`` covers any vision/text tower pair (the embedded demo
#: model is one); its embeddings are the outputs of its two projection layers, whatever the towers.
FAMILIES: tuple[DualEncoderFamily, ...] = (
    DualEncoderFamily("CLIP", ("CLIPModel",), text_pooled_at_eos_token=True),
    DualEncoderFamily("vision-text dual encoder", ("VisionTextDualEncoderModel",)),
)

SUPPORTED_MODEL_CLASSES: tuple[str, ...] = tuple(name for family in FAMILIES for name in family.model_classes)


class UnsupportedModelError(ValueError):
    """The model is not a dual encoder whose embeddings a forget adapter can edit exactly."""


def family_of(model) -> DualEncoderFamily:
    """The :class:`DualEncoderFamily` of ``model`` (a transformers model, unwrapped), or :class:`UnsupportedModelError`.

    Matching is by class name along the model's MRO, so a subclass of ``CLIPModel`` is a CLIP model, while an
    unrelated class with layers of the same names (``XCLIPModel``) is not.
    """
    for cls in type(model).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.model_classes:
                return family
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by forget adapters. An adapter edits the layer whose output is "
        "the joint embedding, which is exact only for model classes checked to have that property: "
        f"{', '.join(SUPPORTED_MODEL_CLASSES)}. (For example, XCLIPModel runs a multi-frame transformer after "
        "`visual_projection`, so editing that layer would not remove the class from its video embeddings.)"
    )


__all__ = ["FAMILIES", "SUPPORTED_MODEL_CLASSES", "DualEncoderFamily", "UnsupportedModelError", "family_of"]
