"""The forget layers as modules: :class:`Linear` around an ``nn.Linear`` projection (mergeable) and
:class:`OutputEdit` on the output of another module whose output is the joint embedding (never merged)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import EditSettings, ProjectionEditLayer, refuse_mixed_batch


class _ForgetModule(nn.Module, ProjectionEditLayer):
    """The forget layer as a module (see :class:`Linear` and :class:`OutputEdit`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        settings: EditSettings,
        forget_rank: int,
        retain_rank: int = 0,
        inference_mode: bool = True,
        image_side: bool = True,
        embedding_dim: int | None = None,
        channel_dim: int = -1,
        **kwargs,
    ) -> None:
        super().__init__()
        ProjectionEditLayer.__init__(self, base_layer, image_side=image_side, embedding_dim=embedding_dim, **kwargs)
        if self.mergeable and channel_dim != -1:
            raise ValueError(
                f"A forget layer around an nn.Linear edits its output features, the last axis; got channel_dim="
                f"{channel_dim}. Declare `channel_dim` only for a module whose output holds the embedding's "
                "channels on another axis (EmbeddingSide in hf_clip_forget.families)."
            )
        # the axis of the output that holds the embedding's channels (1: ALIGN's pooled convolutional map)
        self.channel_dim = channel_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings, forget_rank, retain_rank, inference_mode=inference_mode)
        self.register_load_state_dict_post_hook(_refuse_non_finite_factors)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) would round the factors too; keep them float32 on the new device.
        # (Defined here, not on the mixin: nn.Module precedes ProjectionEditLayer in this class's MRO.)
        factors = {
            (store_name, key): value
            for store_name in ("projection_edit_forget", "projection_edit_retain")
            for key, value in getattr(self, store_name).items()
        }
        result = super()._apply(fn, recurse)
        device = self._device()
        for (store_name, key), value in factors.items():
            getattr(self, store_name)[key] = value.to(device=device, dtype=torch.float32)
        self._edit_cache.clear()
        # a dtype or device move rounds or moves the merged and the unedited weight alike: still consistent
        self._merge_record = None
        return result

    def __getstate__(self) -> dict:
        # deepcopy and pickle: the copy recomputes its edit from its own factors
        state = super().__getstate__()
        state["_edit_cache"] = {}
        state["_merge_record"] = None
        return state

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        refuse_mixed_batch(kwargs.pop("adapter_names", None))
        if self._bypass_edits:
            return self._unedited_forward(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.projection_edit_settings]
        if self.merged:
            self._check_merged_weight()
            pending = [name for name in active if name not in self.merged_adapters]
            if not pending:
                return self.base_layer(x, *args, **kwargs)
            # some active adapters are not merged: apply the whole union to the unedited output
            result = self._unedited_forward(x, *args, **kwargs)
            active = list(self.merged_adapters) + pending
        else:
            result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        edit = self.combined_edit(active, device=result.device)
        # M acts on the channel axis only, so it is exact on any layout: move that axis last and back
        channels_last = result.movedim(self.channel_dim, -1)
        return edit.apply(channels_last.to(torch.float32)).to(result.dtype).movedim(-1, self.channel_dim)

    def _unedited_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.mergeable:
            return self.base_layer(x, *args, **kwargs)
        bias = self.unedited_bias()
        return nn.functional.linear(x, self.unedited_weight().to(x.dtype), None if bias is None else bias.to(x.dtype))

    def __repr__(self) -> str:
        return "projection_edit." + super().__repr__()


class Linear(_ForgetModule):
    """A forget adapter around an ``nn.Linear`` (bias allowed) whose output is the joint embedding: mergeable."""


class OutputEdit(_ForgetModule):
    """A forget adapter on the output of a module that is not a Linear layer but whose output is the joint
    embedding (SigLIP's image pooling head, ALIGN's average pooling): ``y ↦ M y`` along the output's channel axis
    (``channel_dim``), exact; merging is refused."""


def _refuse_non_finite_factors(layer: ProjectionEditLayer, incompatible_keys) -> None:
    """After any ``load_state_dict`` (peft's and transformers' loaders included): refuse NaN or inf factors at load,
    naming the adapter, rather than at the first forward."""
    for store in (layer.projection_edit_forget, layer.projection_edit_retain):
        for name, factor in store.items():
            if factor.device.type != "meta" and not torch.isfinite(factor).all():
                raise ValueError(
                    f"The loaded factors of forget adapter {name!r} contain NaN or inf values: the adapter file is "
                    "corrupt. Re-download or rebuild it."
                )
