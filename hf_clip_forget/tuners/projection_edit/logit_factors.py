"""The factors of a ``method="logit"`` adapter: which prompts are the classifier, the forget keys and the kept keys.

:func:`~hf_clip_forget.core.logit_edit.logit_constrained_edit` does the math; this module decides what it is given,
from the cells a build embedded (:class:`~.embedder.Embeddings`):

* the classifier: each named class's plain prompts (the config's templates) averaged — the zero-shot classifier the
  edit is exact for (with other prompts, the other classes' logits move by the difference only);
* the forget keys of a class: its forget cells (``plan.forget``): the plain cell for a global edit, one cell per
  forgotten domain for a domain edit — averaged per cell, or one key per prompt with ``average_templates=False``;
* the kept keys: the retain cells, except, for a domain edit, the other classes' cells *in the forgotten domains*:
  lowering the forgotten class's logit cannot hurt an image of another class, so holding those cells would only
  take away the direction the edit needs (on PACS, holding them cost the kept domains 5-20 points more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...core import DomainCell, EditFactors, logit_constrained_edit, normalize_rows, plan_domain_edit
from ...core import domain_templates as templates_of_domain
from .config import ProjectionEditConfig
from .embedder import Embedder, Embeddings


def logit_edit_factors(embedder: Embedder, embeddings: Embeddings, config: ProjectionEditConfig) -> EditFactors:
    """``EditFactors(forget=dual vectors (d, k), retain=detectors (d, k))`` of a logit-constrained edit, float32."""
    plan = embeddings.plan or plan_domain_edit(
        config.forgotten_classes, retain_classes=config.retain_classes, paradigm="global"
    )
    classes = [*config.forgotten_classes, *config.retain_classes]
    classifier = normalize_rows(embedder.prompt_embeddings(classes, embedder.templates).mean(dim=1))
    cells_of: dict[str, list[DomainCell]] = {}  # forgotten class → its forget cells, in one pass over the plan
    for cell in plan.forget:
        cells_of.setdefault(cell.class_name, []).append(cell)
    # the forgotten classes come first in ``classes``: the i-th one is the classifier's row i
    forget = {i: _keys(embedder, embeddings, cells_of.get(name, []), config)
              for i, name in enumerate(config.forgotten_classes)}  # fmt: skip
    kept_cells = [c for c in plan.retain if plan.paradigm == "global" or c.domain not in config.domains]
    kept = _keys(embedder, embeddings, kept_cells, config) if kept_cells else None
    edit = logit_constrained_edit(classifier, forget, kept, mu=config.logit_mu, margin=config.logit_margin)
    idle = [name for name, column in zip(config.forgotten_classes, edit.right.T, strict=True) if not column.any()]
    if idle:
        raise ValueError(
            f"On their own forget prompts, {idle} already score at least logit_margin={config.logit_margin:g} below "
            "the best other class, so a logit-constrained edit has nothing to lower. Raise `logit_margin`, or check "
            "that the retain classes are the candidates you classify among."
        )
    return EditFactors(edit.left.to(torch.float32).contiguous(), edit.right.to(torch.float32).contiguous())


def _keys(embedder: Embedder, embeddings: Embeddings, cells: Sequence[DomainCell], config) -> Tensor:
    """The keys of ``cells``: each cell's prompts (as the build embedded them) averaged, or every prompt. The
    averages are normalised together, in one operation however many cells (20,000 retain classes) there are."""
    rows = []
    for cell in cells:
        prompts = embeddings.prompts.get(cell)
        if prompts is None:  # a cell the build did not need to embed (e.g. a forgotten class's plain cell)
            templates = (
                embedder.templates
                if cell.domain is None
                else templates_of_domain(cell.domain, config.domain_templates)
            )
            prompts = embedder.prompt_embeddings([cell.class_name], templates)[0]
        rows.append(prompts.mean(dim=0) if config.average_templates else prompts)
    if config.average_templates:
        return normalize_rows(torch.stack(rows))
    return torch.cat(rows).to(torch.float64)
