"""What an audit works with: the audited adapters' classes and templates, and the model's text side before and after.

:class:`AuditSetup` is the request, validated once; :class:`EmbeddingSpace` computes every embedding a probe needs,
with the forget edits active ("after") or bypassed ("before"), each prompt encoded once per state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..api import holds_forget_adapters
from ..core import HELD_OUT_TEMPLATES, encode_prompts, fill_templates, normalize_rows, resolve_templates
from ..core.prompt_store import RowTable
from ..evaluation import find_visual_projection
from ..families import family_of
from ..tuners.projection_edit import ProjectionEditLayer


@dataclass(frozen=True)
class AuditSetup:
    """The validated request of an audit.

    Attributes:
        adapters: the active forget adapters audited.
        forgotten: the classes they forget.
        candidates: every class name a forgotten class competes with (the forgotten ones first).
        templates: the templates the adapters were built with (what zero-shot classification uses here).
        held_out: paraphrase templates none of the adapters was built with.
        neighbours: forgotten class → other names to try.
        descriptions: forgotten class → free-form descriptions to try.
    """

    adapters: tuple[str, ...]
    forgotten: tuple[str, ...]
    candidates: tuple[str, ...]
    templates: tuple[str, ...]
    held_out: tuple[str, ...]
    neighbours: Mapping[str, tuple[str, ...]]
    descriptions: Mapping[str, tuple[str, ...]]


def active_forget_adapters(model: nn.Module) -> tuple[str, ...]:
    """The active forget adapters of ``model``; ``ValueError`` when it holds none (nothing to audit)."""
    if not holds_forget_adapters(model):
        raise ValueError(
            f"{type(model).__name__} holds no forget adapter, so there is nothing to audit. Pass the model returned "
            "by `add_forget_adapter` or loaded with `ForgetPeftModel.from_pretrained`."
        )
    active = tuple(name for name in model.active_adapters if name in model.peft_config)
    if not active:
        raise ValueError("No forget adapter is active: activate the adapters to audit with `set_adapter`.")
    return active


def edit_setup(
    model: nn.Module,
    candidate_classes: Sequence[str] | None,
    held_out_templates: str | Sequence[str] | None,
    descriptions: Mapping[str, Sequence[str]] | None,
) -> AuditSetup:
    """The :class:`AuditSetup` of ``model``'s active adapters, before neighbour names are added."""
    adapters = active_forget_adapters(model)
    configs = [model.peft_config[name] for name in adapters]
    forgotten = tuple(dict.fromkeys(c for config in configs for c in config.forgotten_classes))
    if not forgotten:
        raise ValueError(
            f"The adapters {list(adapters)} record no forgotten class names (built from embeddings?): the audit "
            "needs the names to probe. Audit an adapter built from class names."
        )
    kept = [c for config in configs for c in config.retain_classes]
    candidates = tuple(dict.fromkeys([*forgotten, *kept, *(candidate_classes or ())]))
    templates = tuple(dict.fromkeys(t for config in configs for t in config.templates))
    held_out = tuple(t for t in resolve_templates(held_out_templates or HELD_OUT_TEMPLATES) if t not in templates)
    if not held_out:
        raise ValueError("Every held-out template was used to build the edit: pass other `held_out_templates`.")
    unknown = sorted(set(descriptions or {}) - set(forgotten))
    if unknown:
        raise ValueError(f"`descriptions` names {unknown}, which the adapters do not forget ({list(forgotten)}).")
    return AuditSetup(
        adapters=adapters,
        forgotten=forgotten,
        candidates=candidates,
        templates=templates or tuple(resolve_templates(family_of(model.get_base_model()).default_templates)),
        held_out=held_out,
        neighbours={},
        descriptions={name: tuple(texts) for name, texts in (descriptions or {}).items()},
    )


class EmbeddingSpace:
    """Text embeddings of the audited model with its edits active or bypassed, and the image-side edit.

    A text prompt embedded by the *unedited* text tower stands in for an image of what it describes ("a text
    proxy"); the image-side edit, applied to it, gives what the edited image side would make of such an image.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapters: Sequence[str],
        batch_size: int,
        show_progress: bool,
        use_cache: bool = True,
    ):
        self.model = model
        self.base = model.get_base_model()
        self.tokenizer = tokenizer
        self.adapters = list(adapters)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.use_cache = use_cache
        self._memo: dict[bool, RowTable] = {}  # edited or not → each prompt's row, gathered at once
        self.edits_text = any(
            not layer.image_side and any(name in layer.projection_edit_settings for name in self.adapters)
            for layer in self.base.modules()
            if isinstance(layer, ProjectionEditLayer)
        )

    def prompts(self, prompts: Sequence[str], edited: bool) -> Tensor:
        """Normalised ``(n, d)`` float64 embeddings of ``prompts`` by the text side, edited or not (each prompt
        encoded once per state, all gathered at once)."""
        edited = edited and self.edits_text  # an image-side edit leaves every text embedding as it was
        memo = self._memo.setdefault(edited, RowTable(torch.float64))
        missing = memo.missing(prompts)
        if missing:
            if edited:
                encoded = self._encode(missing)
            else:
                with self.model.base_model.edits_bypassed():
                    encoded = self._encode(missing)
            memo.add(missing, normalize_rows(encoded.float()))
        return memo.gather(prompts)

    def _encode(self, prompts: list[str]) -> Tensor:
        return encode_prompts(
            self.base, self.tokenizer, prompts, self.batch_size, self.show_progress, use_cache=self.use_cache
        )

    def classes(self, names: Sequence[str], templates: Sequence[str], edited: bool) -> Tensor:
        """Template-averaged, normalised class embeddings ``(len(names), d)``, as zero-shot classification uses."""
        prompts = [prompt for name in names for prompt in fill_templates(name, templates)]
        per_class = self.prompts(prompts, edited).reshape(len(names), len(templates), -1)
        return normalize_rows(per_class.mean(dim=1))

    def proxies(self, texts: Sequence[str], edited: bool) -> Tensor:
        """Text proxies of images showing ``texts``: the unedited text embeddings, with the image-side edit applied
        when ``edited``."""
        vectors = self.prompts(texts, edited=False)
        return normalize_rows(self.image_edit(vectors)) if edited else vectors

    def image_edit(self, vectors: Tensor) -> Tensor:
        """``vectors`` under the active image-side edit (unchanged when the adapters edit the text side only)."""
        layer = find_visual_projection(self.base)
        edit = layer.current_edit(torch.device("cpu")) if isinstance(layer, ProjectionEditLayer) else None
        return vectors if edit is None else edit.apply(vectors.float())


__all__ = ["AuditSetup", "EmbeddingSpace", "active_forget_adapters", "edit_setup"]
