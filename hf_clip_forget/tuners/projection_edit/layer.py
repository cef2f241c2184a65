from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...core.subspace import EditSpec, LowRankEdit, compose_edits
from .edit_state import CachedEdit, FactorState, MergeRecord, tensor_token


@dataclass(frozen=True)
class EditSettings:
    """The hyperparameters of one adapter on one layer (from its config; not saved as tensors)."""

    method: str
    alpha: float
    ccup_lambda: float
    ccup_mu: float
    rank_tolerance: float


#: Why ``adapter_names=`` (peft's mixed-adapter batches) is refused.
MIXED_BATCH_ERROR = (
    "Forget adapters apply to the whole batch: `adapter_names=` (peft's mixed-adapter batches, one adapter per "
    "sample) is not supported, since a forgotten class must stay forgotten for every input. Choose the active "
    "adapters with `set_adapter(...)`, or use `with model.disable_adapter():` for the unedited model."
)


def refuse_mixed_batch(adapter_names) -> None:
    """Raise the ``ValueError`` of :data:`MIXED_BATCH_ERROR` when ``adapter_names`` is given (not ``None``)."""
    if adapter_names is not None:
        raise ValueError(MIXED_BATCH_ERROR)


class ProjectionEditLayer(BaseTunerLayer):
    """Wraps an ``nn.Linear`` projection ``y = W x`` with the union of the active forget edits ``y ↦ M y``.

    Per adapter, the layer stores a forget factor (``(d, k)``, persistent float32 buffer) and, for CCUP, a retain
    factor; the combined ``M = I − U Vᵀ`` of the active adapters is computed in float64 by
    :func:`hf_clip_forget.core.compose_edits`, cached, and applied in float32.

    Merging writes ``M W`` into the weight after keeping a copy of the weight from before the first merge; unmerging
    puts that copy back, so a merge/unmerge round trip restores the weight bit for bit in any dtype (``M`` is singular
    at ``alpha = 1``, so no inverse could). Merging more adapters later recomputes ``M`` of the whole merged union
    from that copy: stacked merges are the union, never a product of projectors.

    Every change of a factor or a setting takes effect at the next forward, however it is made (``set_factors``,
    ``load_state_dict``, ``set_peft_model_state_dict``, ``load_adapter`` into an existing name, an in-place edit):
    the cached edit is keyed on the factor tensors and their version counters. On a merged layer the merged weight
    is recomputed from the copy of the unedited weight; a weight loaded into a merged layer is accepted when it is
    the unedited weight (then re-merged) or the merged one, and refused otherwise. Copies (``copy.deepcopy``,
    ``pickle``) never carry the cache.
    """

    # Nothing is trainable: peft toggles requires_grad only on `adapter_layer_names`.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (
        "projection_edit_forget",
        "projection_edit_retain",
        "projection_edit_settings",
    )

    def __init__(
        self, base_layer: nn.Module, image_side: bool = True, embedding_dim: int | None = None, **kwargs
    ) -> None:
        self.base_layer = base_layer
        # image-side layers apply Mᵀ so that logits v·t see M applied to the text directions (LowRankEdit.transposed)
        self.image_side = image_side
        self.projection_edit_forget = BufferDict({}, persistent=True)
        self.projection_edit_retain = BufferDict({}, persistent=True)
        self.projection_edit_settings: dict[str, EditSettings] = {}
        # the weight (and bias) before the first merge; non-persistent, so they follow .to() but are never saved
        self.register_buffer("projection_edit_pristine_weight", None, persistent=False)
        self.register_buffer("projection_edit_pristine_bias", None, persistent=False)
        self._edit_cache: dict[tuple, CachedEdit] = {}
        self._merge_record: MergeRecord | None = None
        self._bypass_edits = False
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        # an nn.Linear is mergeable: with a bias, M(Wx + b) = (MW)x + Mb, so merging writes MW and Mb and unmerging
        # puts back both. Another module whose output is the embedding (SigLIP's pooling head) is edited on its
        # output only: exact, never merged.
        self.mergeable = isinstance(base, nn.Linear)
        if self.mergeable:
            self.in_features, self.out_features = base.in_features, base.out_features
        elif embedding_dim is not None:
            self.in_features, self.out_features = None, int(embedding_dim)
        else:
            raise TypeError(
                f"Forget adapters wrap torch.nn.Linear layers, or a module whose output is the embedding when its "
                f"dimension is given; got {type(base).__name__}."
            )
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        settings: EditSettings,
        forget_rank: int,
        retain_rank: int,
        inference_mode: bool = True,
    ) -> None:
        device = self._device()
        # zeros until set_factors() or a checkpoint fills them; float32 whatever the model dtype
        self.projection_edit_forget[adapter_name] = torch.zeros(self.out_features, forget_rank, device=device)
        if retain_rank:
            self.projection_edit_retain[adapter_name] = torch.zeros(self.out_features, retain_rank, device=device)
        self.projection_edit_settings[adapter_name] = settings
        self._edit_cache.clear()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_factors(self, adapter_name: str, forget: torch.Tensor, retain: torch.Tensor | None = None) -> None:
        """Store the ``(d, k)`` forget factor (and the CCUP retain factor) of ``adapter_name`` as float32."""
        if adapter_name not in self.projection_edit_settings:
            raise KeyError(f"Adapter {adapter_name!r} does not exist on this layer.")
        device = self._device()
        for store, factor in ((self.projection_edit_forget, forget), (self.projection_edit_retain, retain)):
            if factor is None:
                continue
            if factor.ndim != 2 or factor.shape[0] != self.out_features:
                raise ValueError(
                    f"A factor for this layer must be ({self.out_features}, k), got {tuple(factor.shape)}."
                )
            store[adapter_name] = factor.detach().to(device=device, dtype=torch.float32).contiguous()
        self._edit_cache.clear()

    def _device(self) -> torch.device:
        # a module without parameters or buffers (ALIGN's average pooling) has no device of its own: its factors
        # then stay where they are, moved with the model (the edit follows its output, see combined_edit)
        base = self.get_base_layer()
        tensor = next(itertools.chain(base.parameters(), base.buffers(), self.projection_edit_forget.values()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _refuse_merge(self) -> None:
        if not self.mergeable:
            raise ValueError(
                f"This forget adapter edits the output of a {type(self.get_base_layer()).__name__}, which is not a "
                "Linear layer (e.g. SigLIP's image pooling head, whose output is the embedding but which ends in a "
                "residual sum, or ALIGN's average pooling, which has no weights): the edit is exact on its output "
                "but cannot be written into weights. Keep the adapter unmerged (save and push it as an adapter), "
                "or edit the text side (target='text'), which is mergeable. Nothing was merged."
            )

    def _get_available_adapters(self) -> set[str]:
        return set(self.projection_edit_settings)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # peft's default would also cast the factors to the base layer's dtype (bf16 factors are not orthonormal)
        device = device if device is not None else self._device()
        for store in (self.projection_edit_forget, self.projection_edit_retain):
            if adapter_name in store and store[adapter_name].device.type != "meta":
                store[adapter_name] = store[adapter_name].to(device)
        self._edit_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._edit_cache.clear()

    def applied_adapters(self) -> list[str]:
        """The adapters whose union the next forward applies to the layer's unedited output, in the order the forward
        composes them: none when adapters are disabled (or bypassed); when merged, the merged ones and then any
        active adapter not merged yet; otherwise the active adapters present on this layer."""
        if self._bypass_edits or self.disable_adapters:
            return []
        active = [name for name in self.active_adapters if name in self.projection_edit_settings]
        if self.merged:
            return list(self.merged_adapters) + [name for name in active if name not in self.merged_adapters]
        return active

    # torch.compile: the cache look-up runs eagerly at every call (a graph break), so that no compiled guard can keep
    # a stale edit, and dynamo never traces the float64 composition
    @torch.compiler.disable
    def combined_edit(self, adapter_names: list[str], device: torch.device | None = None) -> LowRankEdit:
        """The float32 edit of the union of ``adapter_names`` (those present on this layer), cached: ``M`` of
        :func:`~hf_clip_forget.core.compose_edits` on a text-side layer, ``Mᵀ`` on an image-side one; on
        ``device`` (default: the layer's)."""
        names = tuple(sorted(name for name in adapter_names if name in self.projection_edit_settings))
        device = self._device() if device is None else device
        key = (names, device, self.image_side)
        state = self._factor_state(names)
        cached = self._edit_cache.get(key)
        if cached is not None and cached.state.same_as(state):
            return cached.edit
        specs = [self._spec(name) for name in names]
        tolerance = min((self.projection_edit_settings[n].rank_tolerance for n in names), default=1e-5)
        edit = compose_edits(specs, self.out_features, rtol=tolerance)
        edit = (edit.transposed() if self.image_side else edit).to(device=device, dtype=torch.float32)
        if state.tokens is None:
            self._edit_cache.pop(key, None)
        else:
            self._edit_cache[key] = CachedEdit(state, edit)
        return edit

    def _factor_state(self, names) -> FactorState:
        """The factor tensors and settings of ``names`` (present on this layer), with their change tokens."""
        tensors, tokens = [], []
        for name in sorted(set(names) & set(self.projection_edit_settings)):
            tokens.append((name, self.projection_edit_settings[name]))
            for store in (self.projection_edit_forget, self.projection_edit_retain):
                tensor = store[name] if name in store else None
                token = tensor_token(tensor)
                if token is None:
                    return FactorState(tuple(tensors), None)
                tensors.append(tensor)
                tokens.append(token)
        return FactorState(tuple(tensors), tuple(tokens))

    def _spec(self, name: str) -> EditSpec:
        settings = self.projection_edit_settings[name]
        return EditSpec(
            name=name,
            method=settings.method,
            forget=self.projection_edit_forget[name],
            retain=self.projection_edit_retain[name] if name in self.projection_edit_retain else None,
            alpha=settings.alpha,
            ccup_lambda=settings.ccup_lambda,
            ccup_mu=settings.ccup_mu,
        )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``M W − W`` for this one adapter alone on the unedited weight (float32), as peft's API expects."""
        self._refuse_merge()
        weight = self.unedited_weight().to(torch.float32)
        return self.combined_edit([adapter_name]).apply_to_weight(weight) - weight

    def unedited_weight(self) -> torch.Tensor:
        """The weight as it was before any merge."""
        if self.projection_edit_pristine_weight is not None:
            return self.projection_edit_pristine_weight
        return self.get_base_weight()

    def unedited_bias(self) -> torch.Tensor | None:
        """The bias as it was before any merge (``None`` for a bias-free layer)."""
        if self.projection_edit_pristine_bias is not None:
            return self.projection_edit_pristine_bias
        return self.get_base_layer().bias

    def merged_bias(self, adapter_names: list[str]) -> torch.Tensor | None:
        """``M b₀`` for the union of the already merged adapters and ``adapter_names`` (``None`` without a bias)."""
        pristine = self.unedited_bias()
        if pristine is None:
            return None
        edit = self.combined_edit(list(self.merged_adapters) + list(adapter_names))
        return edit.apply(pristine.detach().to(torch.float32)).to(pristine.dtype)

    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """``M W₀`` for the union of the already merged adapters and ``adapter_names``, in the weight's dtype.

        Computes without writing anything; raises a ``ValueError`` if the layer is not mergeable, or, with peft's
        wording ("NaNs detected in the merged weights. The adapter <name> seems to be broken", as LoRA's
        ``merge(safe_merge=True)``), if a factor of the union or the result holds NaN or inf: the adapters whose
        factors are not finite are named, else every adapter of the union (a weight that is not finite itself, or an
        edit that overflows its dtype). Every merge path (``merge``, ``merge_adapter``, ``merge_and_unload``, with or
        without ``safe_merge``, ``save_merged_pretrained``) computes the weight here first.
        """

        def broken(names: list[str], reason: str) -> ValueError:
            return ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken: {reason}. "
                "Nothing was merged."
            )

        self._refuse_merge()
        union = dict.fromkeys([*self.merged_adapters, *adapter_names])
        names = [name for name in union if name in self.projection_edit_settings]
        stores = (self.projection_edit_forget, self.projection_edit_retain)
        corrupt = [n for n in names if not all(torch.isfinite(s[n]).all() for s in stores if n in s)]
        if corrupt:  # checked before composing, which would refuse them in other words
            reason = (
                "its factors hold NaN or inf values (a corrupted file or a failed build); delete it and build or load "
                "it again"
            )
            raise broken(corrupt, reason)
        pristine = self.unedited_weight()
        edit = self.combined_edit(names)
        merged = edit.apply_to_weight(pristine.to(torch.float32)).to(pristine.dtype)
        bias = self.merged_bias(adapter_names)
        if not torch.isfinite(merged).all() or (bias is not None and not torch.isfinite(bias).all()):
            base_bias = self.unedited_bias()
            if not torch.isfinite(pristine).all() or (base_bias is not None and not torch.isfinite(base_bias).all()):
                raise broken(names, "the layer's own weight or bias holds NaN or inf values")
            raise broken(names, f"merging it takes the weight past the range of {pristine.dtype}")
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the union of the already merged adapters and ``adapter_names`` (default: the active ones).

        The merged weight is always computed and checked for NaN/inf before anything is written (``safe_merge``
        is accepted for compatibility and always on).
        """
        # check_adapters_to_merge warns as peft does ("All adapters are already merged, nothing to do.")
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.projection_edit_settings]
        if not adapter_names:
            return
        self.write_merged_weight(self.merged_weight(adapter_names), adapter_names)

    def write_merged_weight(self, merged: torch.Tensor, adapter_names: list[str]) -> None:
        """Write a weight computed by :meth:`merged_weight` and record ``adapter_names`` as merged."""
        if self.projection_edit_pristine_weight is None:
            self.projection_edit_pristine_weight = self.get_base_weight().clone()
            bias = self.get_base_layer().bias
            self.projection_edit_pristine_bias = None if bias is None else bias.detach().clone()
        bias = self.merged_bias(adapter_names)
        self.set_base_weight(merged)
        self._set_bias(bias)
        self.merged_adapters.extend(adapter_names)
        self._record_merge()

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            with torch.no_grad():
                self.get_base_layer().bias.copy_(bias)

    def _record_merge(self) -> None:
        """Remember what the merged weight was computed from (see :meth:`_check_merged_weight`)."""
        weight = self.get_base_layer().weight
        names = tuple(self.merged_adapters)
        self._merge_record = MergeRecord(names, self._factor_state(names), weight, tensor_token(weight))

    @torch.compiler.disable
    def _check_merged_weight(self) -> None:
        """Bring a merged weight up to date after its factors or its weight changed since the merge.

        New factors of a merged adapter are merged anew from the unedited weight. A weight written into a merged
        layer (``load_state_dict``) is kept if it is the merged weight of the current factors, re-merged if it is the
        unedited weight, and refused otherwise: the layer cannot tell what it is.
        """
        if not self.merged:
            self._merge_record = None
            return
        record = self._merge_record
        if record is None:  # a copy (deepcopy, pickle) or a dtype/device move: its state is consistent
            self._record_merge()
            return
        weight = self.get_base_layer().weight
        names = tuple(self.merged_adapters)
        weight_token = tensor_token(weight)
        weight_kept = weight is record.weight and weight_token is not None and weight_token == record.weight_token
        if names == record.names and weight_kept and self._factor_state(names).same_as(record.factors):
            return
        expected = self.merged_weight([])
        current = weight.detach()
        if weight_kept or torch.equal(current, self.unedited_weight()):
            self.set_base_weight(expected)
            self._set_bias(self.merged_bias([]))
        elif not torch.equal(current, expected):
            raise RuntimeError(
                f"A new weight was written into a projection layer with merged forget adapters {list(names)} (e.g. by "
                "`load_state_dict`), and it is neither the unedited weight nor the merged weight of the current "
                "factors, so the layer cannot tell what it holds. Call `unmerge_adapter()` before loading base "
                "weights (it restores the weight from before the merge), then merge again."
            )
        self._record_merge()

    def unmerge(self) -> None:
        """Put back the weight from before the first merge, bit for bit, and mark every adapter unmerged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.set_base_weight(self.projection_edit_pristine_weight)
        self._set_bias(self.projection_edit_pristine_bias)
        self.projection_edit_pristine_weight = None
        self.projection_edit_pristine_bias = None
        self.merged_adapters.clear()
        self._merge_record = None

    @contextlib.contextmanager
    def edits_bypassed(self):
        """Within this context, forward computes the unedited layer; merge state is left alone."""
        previous, self._bypass_edits = self._bypass_edits, True
        try:
            yield
        finally:
            self._bypass_edits = previous

    def current_edit(self, device: torch.device | None = None) -> LowRankEdit | None:
        """The edit this layer's output carries now, as a map of unedited outputs (channels last): ``None`` while
        its edits are bypassed or its adapters disabled, or with no active adapter on it; otherwise the combined
        edit of its active adapters (written into the weights when merged, applied to the output when not)."""
        if self._bypass_edits or self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.projection_edit_settings]
        return self.combined_edit(active, device=device) if active else None


#: The module classes moved to :mod:`.modules`, still importable from here.
_MOVED_TO_MODULES = ("Linear", "OutputEdit", "_ForgetModule", "_refuse_non_finite_factors")


def __getattr__(name: str):
    # resolved lazily: .modules imports this file, so importing it at the top would be circular
    if name in _MOVED_TO_MODULES:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
