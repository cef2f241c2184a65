"""Which dual encoders forget adapters support, and where their joint embeddings come from: the one place that
holds model-specific knowledge.

A forget adapter edits the layer whose *output is* the joint embedding (``W' = M W``, and ``b' = M b`` when the
layer has a bias), so that every image (or text) embedding becomes ``M`` times the original. That is exact only when
nothing but normalisation follows that layer before the embedding is compared with the other side. Model classes are
therefore listed here explicitly, each after checking that property on both sides; any other class is refused with
:class:`UnsupportedModelError` rather than edited inexactly (``XCLIPModel``, for one: a multi-frame transformer
follows its ``visual_projection``).

Adding a family is one :class:`DualEncoderFamily` entry in :data:`FAMILIES`, plus its tiny model in the family
tests. Layer 1: imports nothing from this package, and transformers only by class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingSide:
    """One side of a dual encoder: the module whose output is that side's joint embedding, and how to compute it.

    The embedding of a batch is ``features(**inputs)`` (its ``pooler_output`` when the method returns a model
    output), or, for a model class without such a method, ``module(tower(**inputs).last_hidden_state)``; then
    position ``token`` of a per-token result.

    Attributes:
        module: dotted path of the layer inside the model (``"visual_projection"``, ``"visual_projection.3"``).
        features: the model method that returns the embedding (``"get_image_features"``; a dotted path for a
            submodule's method, ``"owlvit.get_text_features"``), or ``None`` when ``tower`` is given instead.
        mergeable: the module is an ``nn.Linear``, so the edit can be written into its weights; otherwise (a module
            whose output is the embedding but that ends in, e.g., a residual sum) the edit is applied to its output
            and merging is refused.
        tower: for a model class with no feature method, the dotted path of the encoder whose
            ``last_hidden_state`` the module projects (BLIP retrieval: ``"vision_model"``).
        token: the module runs on every token and the embedding is this position of its output (``0``: FLAVA's
            and BLIP's first token); ``None`` when the module's output is already one vector per input.
        channel_dim: the axis of the module's output that holds the embedding's channels (``1`` for a convolutional
            feature map that is average-pooled into the embedding, as ALIGN's), ``-1`` for features last.
    """

    module: str
    features: str | None = None
    mergeable: bool = True
    tower: str | None = None
    token: int | None = None
    channel_dim: int = -1

    def __post_init__(self) -> None:
        if (self.features is None) == (self.tower is None):
            raise ValueError(f"{self.module!r}: declare exactly one of `features` (a method) and `tower`.")
        if self.tower is not None and self.token is None:
            raise ValueError(f"{self.module!r}: a `tower` side needs the `token` its embedding is read at.")


@dataclass(frozen=True)
class DualEncoderFamily:
    """A family of contrastive dual encoders whose joint embeddings are outputs of ``nn.Linear`` layers.

    Attributes:
        name: a short name for messages and docs.
        model_classes: transformers class names of the family (matched along the model's MRO).
        image: the side compared with text — images, or audio for CLAP, or detected boxes for OWL detectors (the
            side a forget edit removes classes from by default: ``target="visual"``).
        text: the text side.
        text_pooled_at_eos_token: the text embedding is read at the tokenizer's end-of-text token, whose id the
            model config names (``text_config.eos_token_id``), so a tokenizer that does not emit that id gives
            embeddings of the wrong token.
        legacy_eos_id_reads_largest_id: with ``eos_token_id == 2`` (old CLIP configs) the model reads the
            largest token id instead (CLIP's legacy branch), so that id need not be emitted.
        text_padding: how prompts are padded for the text tower (``"longest"``; ``"max_length"`` where the model
            was trained on fixed-length text).
        default_templates: the prompt templates class names are embedded with when none are given for a
            text-side edit, and the family's prompt style (a built-in set of ``hf_clip_forget.core.TEMPLATE_SETS``:
            the 80-template ensemble for image models, sound templates for CLAP).
        image_side_templates: the templates of a global image-side edit that names its retain classes, when none
            are given. CLIP's 7 selected ImageNet templates (``"imagenet_selected"``) for image models: measured on
            real images (``docs/templates.md``), the fewest whose edit forgets and keeps within 0.5 points of the
            best set on every dataset and method (one template leaves up to 1 point more of PACS recognised).
            Without retain classes, on the text side and for domain edits, no smaller set matched the 80-template
            ensemble, which stays the default there.
        inputs: what the non-text side takes: ``"image"`` (``pixel_values``, from an image processor) or
            ``"audio"`` (``input_features``, from a feature extractor), so that callers load the right
            preprocessor and refuse image-only work (visual prototypes, the image-classification harness).
        detector: an open-vocabulary detector: the non-text side embeds every predicted box, text is a set of
            queries, and the model's processor post-processes its output into labelled boxes (so it is evaluated
            by counting boxes per query, not by zero-shot classification).
        scope: what the edit does not reach in this family, in one sentence for the model card (a path of the model
            that scores images and text without the edited layers); empty when the joint embeddings are the only
            path.
        patch_inputs: the image processor cuts images into patches with their grid (``spatial_shapes``, SigLIP 2),
            so synthesised pixel images (visual prototypes) cannot be fed to the model as they are.
    """

    name: str
    model_classes: tuple[str, ...]
    image: EmbeddingSide = EmbeddingSide("visual_projection", features="get_image_features")
    text: EmbeddingSide = EmbeddingSide("text_projection", features="get_text_features")
    text_pooled_at_eos_token: bool = False
    legacy_eos_id_reads_largest_id: bool = False
    text_padding: str = "longest"
    default_templates: str = "imagenet"
    image_side_templates: str = "imagenet_selected"
    inputs: str = "image"
    detector: bool = False
    patch_inputs: bool = False
    scope: str = ""

    @property
    def supports_prototypes(self) -> bool:
        """Whether visual prototypes (pixel images optimised through the image side) can be synthesised."""
        return self.inputs == "image" and not self.detector and not self.patch_inputs

    def __post_init__(self) -> None:
        if self.inputs not in ("image", "audio"):
            raise ValueError(f"{self.name}: `inputs` must be 'image' or 'audio', got {self.inputs!r}.")

    @property
    def projections(self) -> dict[str, str]:
        """``{"visual": image layer path, "text": text layer path}``."""
        return {"visual": self.image.module, "text": self.text.module}

    def target_modules(self, target: str) -> tuple[str, ...]:
        """The layers a ``target`` (``"visual"``, ``"text"`` or ``"both"``) edits."""
        sides = {"visual": (self.image.module,), "text": (self.text.module,)}
        sides["both"] = sides["visual"] + sides["text"]
        if target not in sides:
            raise ValueError(f"`target` must be one of {list(sides)}, got {target!r}.")
        return sides[target]

    def side(self, target: str) -> EmbeddingSide:
        """The :class:`EmbeddingSide` of ``target`` (``"visual"`` or ``"text"``)."""
        if target not in ("visual", "text"):
            raise ValueError(f"`target` must be 'visual' or 'text', got {target!r}.")
        return self.image if target == "visual" else self.text

    def templates_for(self, target_modules: str | Sequence[str], retain_named: bool = False) -> str:
        """The built-in template set an edit of ``target_modules`` (``"visual"``, ``"text"``, or module names)
        uses when none are given: :attr:`image_side_templates` for a global image-side edit that names its retain
        classes (``retain_named``), :attr:`default_templates` otherwise."""
        modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        text_side = any(module == "text" or self.is_text_side(module) for module in modules)
        return self.image_side_templates if retain_named and not text_side else self.default_templates

    def side_of_module(self, module_name: str) -> EmbeddingSide:
        """The :class:`EmbeddingSide` that a full module name (possibly prefixed) belongs to."""
        return self.text if self.is_text_side(module_name) else self.image

    def is_text_side(self, module_name: str) -> bool:
        """Whether ``module_name`` (a full module name, possibly prefixed) is this family's text-side layer."""
        return module_name == self.text.module or module_name.endswith("." + self.text.module)


_DETECTION_SCOPE = (
    "Box coordinates and objectness are not edited: a forgotten query scores every box as an empty query does, and "
    "whether the post-processing threshold then drops its boxes depends on that floor (`hf-clip-forget detect` "
    "reports it); image-guided detection, which also runs through the class head, changes too."
)

#: Every supported family. Each was checked on a tiny random instance (tests/test_families.py): with the edit
#: applied, the embeddings of the family's own feature functions and of its forward have |cos| <= 1e-5 with the
#: forgotten directions on both sides, and merging is bit-exact to revert (docs/families.md).
FAMILIES: tuple[DualEncoderFamily, ...] = (
    DualEncoderFamily("CLIP", ("CLIPModel",), text_pooled_at_eos_token=True, legacy_eos_id_reads_largest_id=True),
    # any vision and text tower pair (the embedded demo model is one): the projections are the embeddings
    DualEncoderFamily("vision-text dual encoder", ("VisionTextDualEncoderModel",)),
    DualEncoderFamily("MetaCLIP 2", ("MetaClip2Model",), text_pooled_at_eos_token=True),
    DualEncoderFamily(
        "CLIPSeg", ("CLIPSegModel",), text_pooled_at_eos_token=True, legacy_eos_id_reads_largest_id=True
    ),
    DualEncoderFamily("AltCLIP", ("AltCLIPModel",)),
    DualEncoderFamily("Chinese-CLIP", ("ChineseCLIPModel",)),
    DualEncoderFamily("AIMv2", ("Aimv2Model",), text_pooled_at_eos_token=True),
    DualEncoderFamily("BLIP", ("BlipModel",)),
    DualEncoderFamily("OWL-ViT", ("OwlViTModel", "Owlv2Model")),
    # image: the attention-pooling head's output is the embedding, but the head ends in a residual sum, so no
    # weight can hold the edit: it is applied to the head's output. Text: a Linear with bias, read at the last
    # position of text padded to the model's fixed length.
    DualEncoderFamily(
        "SigLIP",
        ("SiglipModel",),
        image=EmbeddingSide("vision_model.head", "get_image_features", mergeable=False),
        text=EmbeddingSide("text_model.head", "get_text_features"),
        text_padding="max_length",
    ),
    # open-vocabulary detection: every box's class embedding is the output of the class head's first Linear (with
    # bias), compared with the text query embeddings of the inner model's text projection
    DualEncoderFamily(
        "OWL-ViT detection",
        ("OwlViTForObjectDetection",),
        image=EmbeddingSide("class_head.dense0", "class_predictor"),
        text=EmbeddingSide("owlvit.text_projection", "owlvit.get_text_features"),
        detector=True,
        scope=_DETECTION_SCOPE,
    ),
    DualEncoderFamily(
        "OWLv2 detection",
        ("Owlv2ForObjectDetection",),
        image=EmbeddingSide("class_head.dense0", "class_predictor"),
        text=EmbeddingSide("owlv2.text_projection", "owlv2.get_text_features"),
        detector=True,
        scope=_DETECTION_SCOPE,
    ),
    # audio: the second Linear (with bias) of each side's projection MLP gives the audio and the text embedding
    DualEncoderFamily(
        "CLAP",
        ("ClapModel",),
        image=EmbeddingSide("audio_projection.linear2", "get_audio_features"),
        text=EmbeddingSide("text_projection.linear2", "get_text_features"),
        default_templates="sound",
        image_side_templates="sound",
        inputs="audio",
    ),
    # the last Linear (with bias) of Sequential(Linear, BatchNorm1d, ReLU, Linear)
    DualEncoderFamily(
        "GroupViT",
        ("GroupViTModel",),
        image=EmbeddingSide("visual_projection.3", "get_image_features"),
        text=EmbeddingSide("text_projection.3", "get_text_features"),
        text_pooled_at_eos_token=True,
        legacy_eos_id_reads_largest_id=True,
    ),
    # get_*_features project every token (Linear with bias); the contrastive embedding is the first token's
    # (FlavaForPreTraining's `image_projection(image_embeddings[:, 0])`). Multimodal and ITM paths do not use them.
    DualEncoderFamily(
        "FLAVA",
        ("FlavaModel",),
        image=EmbeddingSide("image_projection", "get_image_features", token=0),
        text=EmbeddingSide("text_projection", "get_text_features", token=0),
        scope="FLAVA's multimodal encoder and its image-text matching head read the towers' features, not the edited "
        "projections: only the contrastive image and text embeddings forget.",
    ),
    # no feature methods: forward(use_itm_head=False) projects each tower's first token (Linear with bias); the
    # default ITM head reads the text tower cross-attending to image tokens, which these layers do not reach
    DualEncoderFamily(
        "BLIP retrieval",
        ("BlipForImageTextRetrieval",),
        image=EmbeddingSide("vision_proj", tower="vision_model", token=0),
        text=EmbeddingSide("text_proj", tower="text_encoder", token=0),
        scope="Only the contrastive scores (`forward(use_itm_head=False)`) forget: the image-text matching head "
        "(the default `forward`) reads the text tower cross-attending to the image tokens and is not edited.",
    ),
    # image: no projection; the embedding is the EfficientNet's last feature map average-pooled over space
    # (`vision_model.pooler`, then a reshape), and a channel edit commutes with that mean, so it is applied exactly
    # to the pooler's (batch, channels, 1, 1) output (folding it into the last block's conv would miss the block's
    # residual). Text: a Linear with bias read at token 0 under the attention mask, so padding changes nothing
    DualEncoderFamily(
        "ALIGN",
        ("AlignModel",),
        image=EmbeddingSide("vision_model.pooler", "get_image_features", mergeable=False, channel_dim=1),
    ),
    # as SigLIP (the pooling head ends in a residual sum); image inputs are pre-cut patches with their mask and grid
    # shapes, which get_image_features takes by name and the embedding function passes on
    DualEncoderFamily(
        "SigLIP 2",
        ("Siglip2Model",),
        image=EmbeddingSide("vision_model.head", "get_image_features", mergeable=False),
        text=EmbeddingSide("text_model.head", "get_text_features"),
        text_padding="max_length",
        patch_inputs=True,
    ),
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
        family = family_of_class(cls.__name__)
        if family is not None:
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by forget adapters. An adapter edits the layer whose output is "
        "the joint embedding, which is exact only for model classes checked to have that property: "
        f"{', '.join(SUPPORTED_MODEL_CLASSES)}. (For example, XCLIPModel runs a multi-frame transformer after "
        "`visual_projection`, so editing that layer would not remove the class from its video embeddings.) A new "
        "family is declared by one DualEncoderFamily entry in hf_clip_forget.families: the dotted paths of the "
        "nn.Linear layers whose outputs are its image and text embeddings."
    )


def family_of_class(class_name: str) -> DualEncoderFamily | None:
    """The family that lists the transformers class named ``class_name``, or ``None``."""
    return next((family for family in FAMILIES if class_name in family.model_classes), None)


def find_family(model) -> DualEncoderFamily | None:
    """:func:`family_of` for a model or a wrapper of one (a ``PeftModel``), ``None`` when unsupported."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return family_of(base)
    except UnsupportedModelError:
        return None


__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_CLASSES",
    "DualEncoderFamily",
    "EmbeddingSide",
    "UnsupportedModelError",
    "family_of",
    "family_of_class",
    "find_family",
]
