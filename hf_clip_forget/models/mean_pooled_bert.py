"""A BERT text tower whose pooled output is the attention-masked mean of its token states.

``VisionTextDualEncoderModel`` projects the text tower's ``pooler_output``. BERT's own pooler (``tanh`` of a dense
layer on ``[CLS]``) is not what sentence-embedding models such as all-MiniLM-L6-v2 were trained to produce: they
mean-pool the token states and L2-normalise. :class:`MeanPooledBertModel` is a ``BertModel`` (same weights, same
state-dict keys) whose ``pooler_output`` is that sentence embedding.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class MeanPooledBertConfig(BertConfig):
    """``BertConfig`` plus ``normalize``: whether the mean-pooled sentence embedding is L2-normalised."""

    model_type = "bert_mean_pooled"

    def __init__(self, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize


class MeanPooledBertModel(BertModel):
    """``BertModel`` without its ``[CLS]`` pooler; ``pooler_output`` is the masked mean of the last hidden states
    (L2-normalised when ``config.normalize``), as sentence-transformers computes it."""

    config_class = MeanPooledBertConfig

    def __init__(self, config: MeanPooledBertConfig):
        super().__init__(config, add_pooling_layer=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        kwargs["return_dict"] = True
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            **kwargs,
        )
        states = outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=states.dtype, device=states.device)
        mask = attention_mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=states,
            pooler_output=pooled,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def register_mean_pooled_bert() -> None:
    """Register the config and model with ``AutoConfig``/``AutoModel`` (idempotent), so that a
    ``VisionTextDualEncoderModel`` with this text tower can be built and reloaded with ``from_pretrained``."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(MeanPooledBertConfig.model_type, MeanPooledBertConfig, exist_ok=True)
    AutoModel.register(MeanPooledBertConfig, MeanPooledBertModel, exist_ok=True)
