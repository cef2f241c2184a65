"""The embeddings an edit is built from: a config's classes (and domain cells, prototypes) through the model's text
tower (and, for prototypes, its image tower), with every prompt's own embedding kept for the effect estimate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...core import (
    DomainCell,
    DomainPlan,
    average_templates,
    class_text_embeddings,
    encode_prompts,
    normalize_rows,
    plan_domain_edit,
    resolve_templates,
    synthesize_prototypes,
)
from ...core import domain_templates as templates_of_domain
from ...families import family_of
from .config import ProjectionEditConfig
from .preprocessors import prototype_geometry, resolve_image_processor


@dataclass(frozen=True)
class Embeddings:
    """What one build embedded.

    Attributes:
        templates: the plain templates.
        forget, retain: the rows of the forget and retain sets (text directions, then prototypes).
        anchor: the bare templates' embedding(s) (text-side edits), or ``None``.
        neighbours: other names of the forgotten classes (``expand_neighbours``): forgotten, but not classes.
        plan: the domain plan (domain-aware edits), or ``None``.
        prompts: each embedded cell → its prompts' own unit embeddings ``(templates, d)`` (before averaging).
        prototypes: ``(n, d)`` forget-cell prototypes' embeddings and the index ``(n,)`` of each one's forget cell
            among ``plan.forget``, or ``None``.
    """

    templates: list[str]
    forget: Tensor
    retain: Tensor | None
    anchor: Tensor | None
    neighbours: Tensor | None = None
    plan: DomainPlan | None = None
    prompts: Mapping[DomainCell, Tensor] = field(default_factory=dict)
    prototypes: tuple[Tensor, Tensor] | None = None


def domain_aware(config: ProjectionEditConfig) -> bool:
    """Whether ``config`` asks for domain cells or prototypes (rather than plain class directions)."""
    return bool(config.domains or config.retain_domains or config.paradigm != "global" or config.prototypes) or bool(
        config.retain_prototypes
    )


class CellPrompts(Mapping):
    """Each embedded cell → its prompts' unit embeddings ``(templates, d)``, kept as the blocks they were embedded in
    (one tensor per call) and looked up by cell: recording 20,000 names costs one dict of names, not 20,000 cells
    and tensor views. A cell recorded twice gives its latest rows, as assigning into a dict would."""

    def __init__(self, blocks: Sequence[tuple] = ()) -> None:
        self._blocks = list(blocks)  # (domain, {name: row}, rows), oldest first

    def add(self, names: Sequence[str], domain: str | None, rows: Tensor) -> None:
        self._blocks.append((domain, {name: index for index, name in enumerate(names)}, rows))

    def copy(self) -> CellPrompts:
        return CellPrompts(self._blocks)

    def __getitem__(self, cell: DomainCell) -> Tensor:
        name, domain = getattr(cell, "class_name", None), getattr(cell, "domain", None)
        for block_domain, position, rows in reversed(self._blocks):
            if block_domain == domain and name in position:
                return rows[position[name]]
        raise KeyError(cell)

    def __iter__(self):
        seen = set()
        for domain, position, _ in reversed(self._blocks):
            for name in position:
                if (name, domain) not in seen:
                    seen.add((name, domain))
                    yield DomainCell(name, domain)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Embedder:
    """Turns a config's classes (and domains, prototypes) into forget, retain and anchor embeddings."""

    def __init__(self, model, config: ProjectionEditConfig, inputs, tokenizer, dim: int) -> None:
        self.model, self.config, self.inputs, self.tokenizer, self.dim = model, config, inputs, tokenizer, dim
        self.templates = resolve_templates(
            config.templates or family_of(model).templates_for(config.target_modules or "visual")
        )
        self.prompts = CellPrompts()

    def embeddings(self, modules: Sequence[str]) -> Embeddings:
        config, inputs = self.config, self.inputs
        plan, prototypes = None, None
        if domain_aware(config):
            plan = plan_domain_edit(
                config.forgotten_classes,
                domains=config.domains,
                retain_domains=config.retain_domains,
                retain_classes=config.retain_classes or None,
                paradigm=config.paradigm,
            )
            forget, retain, prototypes = self._domain_cells(plan)
        else:
            forget = (
                checked_rows(inputs.text_embeds, self.dim, "text_embeds")
                if inputs.text_embeds is not None
                else self.classes(config.forgotten_classes)
            )
            retain = None
            if inputs.retain_text_embeds is not None:
                retain = checked_rows(inputs.retain_text_embeds, self.dim, "retain_text_embeds")
            elif config.retain_classes:
                retain = self.classes(config.retain_classes)
        anchor = self._anchor() if family_of(self.model).text.module in modules else None
        words = [word for names in config.neighbour_names.values() for word in names]
        neighbours = self.classes(words, record=False) if words else None
        return Embeddings(self.templates, forget, retain, anchor, neighbours, plan, self.prompts.copy(), prototypes)

    def classes(self, names: Sequence[str], templates: Sequence[str] | None = None, domain: str | None = None,
                record: bool = True) -> Tensor:  # fmt: skip
        """One row per name (its templates' unit embeddings averaged and renormalised, or one row per template when
        the config does not average); each name's prompts are recorded as the cell ``(name, domain)``."""
        templates = list(templates or self.templates)
        rows = self.prompt_embeddings(names, templates)
        if record:
            self.prompts.add(names, domain, rows)
        if self.config.average_templates:
            return average_templates(rows)
        return rows.reshape(-1, rows.shape[-1])

    def prompt_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """``(names, templates, d)`` unit embeddings of every prompt."""
        return class_text_embeddings(
            self.model, self.tokenizer, list(names), list(templates), False, self.inputs.batch_size,
            self.inputs.show_progress,
        ).embeddings.reshape(len(names), len(templates), -1)  # fmt: skip

    def _cells(self, cells: Sequence[DomainCell]) -> Tensor:
        by_domain: dict[str | None, list[str]] = {}
        for cell in cells:
            by_domain.setdefault(cell.domain, []).append(cell.class_name)
        rows = {}
        for domain, names in by_domain.items():
            templates = None if domain is None else templates_of_domain(domain, self.config.domain_templates)
            rows[domain] = self.classes(names, templates, domain)
        return torch.cat(list(rows.values()))

    def _domain_cells(self, plan: DomainPlan) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        config = self.config
        forget = self._cells(plan.forget)
        retain = self._cells(plan.retain) if plan.retain else None
        if config.retain_prototypes and retain is not None:
            retain = torch.cat([retain, self._prototypes(retain, config.retain_prototypes)[0]])
        prototypes = None
        if config.prototypes:
            prototypes = self._prototypes(forget, config.prototypes)
            forget = torch.cat([forget, prototypes[0]])
            if self.config.average_templates:  # else the targets index (cell, template) rows
                prototypes = (prototypes[0], self._cell_order(plan.forget)[prototypes[1]])
            else:
                prototypes = None
        return forget, retain, prototypes

    @staticmethod
    def _cell_order(cells: Sequence[DomainCell]) -> Tensor:
        """Row ``i`` of ``_cells(cells)`` (grouped by domain in first-seen order) → index of its cell in ``cells``."""
        domains = {domain: i for i, domain in enumerate(dict.fromkeys(cell.domain for cell in cells))}
        order = sorted(range(len(cells)), key=lambda i: domains[cells[i].domain])
        return torch.tensor(order, dtype=torch.long)

    def _prototypes(self, rows: Tensor, count: int) -> tuple[Tensor, Tensor]:
        processor = resolve_image_processor(self.model, self.inputs.image_processor)
        found = synthesize_prototypes(
            self.model, rows, per_target=count, show_progress=self.inputs.show_progress,
            **prototype_geometry(processor), **self.config.prototype_options,
        )  # fmt: skip
        return found.embeddings.to(rows.dtype), found.targets

    def _anchor(self) -> Tensor:
        # the bare templates ("a photo of a ."): where forgotten prompts are sent on the text side
        bare = [template.format("") for template in self.templates]
        anchor = normalize_rows(encode_prompts(self.model, self.tokenizer, bare, self.inputs.batch_size, False))
        return normalize_rows(anchor.mean(dim=0, keepdim=True)) if self.config.average_templates else anchor


def checked_rows(embeds, dim: int, argument: str) -> Tensor:
    """``embeds`` as unit rows, after checking it is a finite ``(n, dim)`` tensor without zero rows."""
    if not isinstance(embeds, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor of shape (n, {dim}), got {type(embeds).__name__}.")
    if embeds.ndim != 2 or embeds.shape[1] != dim or embeds.shape[0] == 0:
        raise ValueError(
            f"`{argument}` must have shape (n, {dim}) — one row per class in the model's {dim}-dimensional "
            f"embedding space — got {tuple(embeds.shape)}."
        )
    if not torch.isfinite(embeds).all():
        raise ValueError(f"`{argument}` contains NaN or inf values; every embedding must be finite.")
    if (embeds.norm(dim=1) == 0).any():
        raise ValueError(f"`{argument}` contains an all-zero row, which has no direction to forget.")
    return normalize_rows(embeds)
