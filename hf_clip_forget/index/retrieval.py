"""Does an edited index still find a forgotten class? Retrieval probes on stored embeddings, and the query-only edit.

Zero-shot classification asks whether a class *wins among class prompts*; retrieval asks whether a query ranks the
class's stored vectors *above every other stored vector*. An edit can do the first and not the second, so an index is
audited on its own terms. For a forgotten class ``c`` with ``R`` of the ``N`` stored vectors:

- **text→image R-precision.** A query ``t`` (a prompt embedded by the *edited* model's text side: what a user's
  search sends) scores each stored vector ``ê_i = M e_i / ‖M e_i‖`` (the index edited by :func:`edit_embeddings`);
  ``P_R(t) = |top_R(t·ê) ∩ c| / R``. A random ranking gives ``E[P_R] = R / N`` (chance), with standard deviation
  :func:`chance_spread`. Measured for the adapter's own templates, held-out templates and neighbour names.
- **image→image precision@R.** Each edited stored vector of ``c`` queries the other ``N − 1``: ``R − 1`` of them are
  relevant, chance ``(R − 1) / (N − 1)``.
- **query only** (the index cannot be rewritten). The query is edited instead, ``q' = Mᵀ q`` (:func:`edit_query`), so
  that ``q'·e = q·(M e)`` exactly for a *raw* stored vector ``e``. A cosine index stores ``e / ‖e‖``, which scores
  ``q·M e / ‖e‖`` instead of the edited index's ``q·M e / ‖M e‖``: the rankings differ by the per-vector factor
  ``‖M e‖ / ‖e‖``, and image→image search is not edited at all (:data:`QUERY_ONLY_CAVEAT`).

Measured on PACS and CIFAR-10 with the demo model in ``docs/index_forgetting.md``
(``scripts/measure_index_forgetting.py``), which :data:`INDEX_RECOMMENDED_OPTIONS` and :func:`index_recommendation`
quote.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize

from ..audit.report import GONE_MARGIN, VERDICTS, AuditRow
from ..audit.run import _per_class, _with_neighbours, check_neighbours
from ..audit.setup import EmbeddingSpace, edit_setup
from ..core import fill_templates
from ..families import FAMILIES
from .edit import EmbeddingEdit, embedding_edit


# ---------------------------------------------------------------------------------------------------- the metrics
def r_precision(scores: Tensor, relevant: Tensor) -> Tensor:
    """R-precision of each row of ``scores``: the share of its ``R`` highest-scored items that are relevant.

    Args:
        scores: ``(q, n)`` scores of ``n`` items for ``q`` queries, or one ``(n,)`` row.
        relevant: ``(n,)`` or ``(q, n)`` boolean; ``R`` is its count per row (at least 1).

    Returns ``(q,)`` (a 0-d tensor for one row) float32: ``P_R = |top_R ∩ relevant| / R``. Ties at the ``R``-th score
    count at their expected value under a random tie-break (``τ`` the ``R``-th score, ``A = {s > τ}``,
    ``T = {s = τ}``: ``(|A ∩ rel| + (R − |A|) |T ∩ rel| / |T|) / R``), so a constant score gives chance exactly.
    """
    single = scores.ndim == 1
    scores = scores.float().reshape(-1, scores.shape[-1])
    relevant = relevant.bool().expand_as(scores).float()
    count = relevant.sum(dim=1)
    if bool((count < 1).any()):
        raise ValueError("Every query needs at least one relevant item to compute an R-precision.")
    ranked = scores.sort(dim=1, descending=True).values
    threshold = ranked.gather(1, (count.long() - 1)[:, None])
    above, tied = (scores > threshold).float(), (scores == threshold).float()
    slots = count - above.sum(dim=1)
    hits = (above * relevant).sum(dim=1) + slots * (tied * relevant).sum(dim=1) / tied.sum(dim=1)
    precision = hits / count
    return precision[0] if single else precision


def chance_precision(relevant: int, total: int) -> float:
    """``R / N``: the expected R-precision of a random ranking of ``N`` items of which ``R`` are relevant."""
    return relevant / total


def chance_spread(relevant: int, total: int) -> float:
    """Standard deviation of the R-precision of a random ranking: the hits among the top ``R`` are hypergeometric
    (``R`` drawn from ``N``, ``R`` relevant), so ``sd = sqrt(p (1 − p) (N − R) / ((N − 1) R))`` with ``p = R / N``.
    On 140 images with 20 relevant it is 0.073; on 7,000 with 1,000, 0.010."""
    if total < 2 or relevant < 1:
        return 0.0
    p = relevant / total
    return math.sqrt(p * (1 - p) * (total - relevant) / ((total - 1) * relevant))


def text_query_precision(queries: Tensor, stored: Tensor, relevant: Tensor) -> Tensor:
    """``(q,)`` R-precision of each text query (``(q, d)``) over the ``stored`` vectors ``(n, d)`` ranked by cosine."""
    return r_precision(normalize(queries.float(), dim=-1) @ normalize(stored.float(), dim=-1).T, relevant)


def image_query_precision(stored: Tensor, relevant: Tensor, max_queries: int = 500, chunk: int = 256) -> Tensor:
    """Precision@(R − 1) of each relevant stored vector used as a query against the *other* stored vectors (cosine),
    ``R − 1`` of which are relevant: ``(m,)`` for ``m = min(R, max_queries)`` queries spread evenly over the class.
    Chance is ``(R − 1) / (N − 1)``."""
    rows = normalize(stored.float(), dim=-1)
    members = relevant.bool().nonzero().squeeze(1)
    if members.numel() < 2:
        raise ValueError("Image→image retrieval needs at least 2 stored vectors of the class.")
    members = members[torch.linspace(0, members.numel() - 1, min(max_queries, members.numel())).round().long()]
    results = []
    for start in range(0, members.numel(), chunk):
        queries = members[start : start + chunk]
        scores = rows[queries] @ rows.T
        others = relevant.bool().expand_as(scores).clone()
        position = torch.arange(queries.numel())
        others[position, queries] = False  # the query is not one of its own results
        scores[position, queries] = float("-inf")
        results.append(r_precision(scores, others))
    return torch.cat(results)


# -------------------------------------------------------------------------------------------- the query-only edit
def query_edit(model: nn.Module, side: str = "image") -> EmbeddingEdit:
    """``q ↦ Mᵀ q``: the transpose of the edit ``model``'s adapters make to its ``side`` embeddings (the factors
    swapped: ``Mᵀ = I − V Uᵀ``), for queries scored against stored vectors that were *not* edited."""
    edit = embedding_edit(model, side)
    return dataclasses.replace(edit, left=edit.right, right=edit.left)


def edit_query(model: nn.Module, queries, side: str = "image"):
    """``Mᵀ q`` for each query row ``q`` (``(n, d)`` tensor or numpy array, returned in its type and dtype, not
    renormalised), where ``M`` is the edit of ``model``'s ``side`` embeddings.

    For a raw stored vector ``e``, ``(Mᵀ q)·e = q·(M e)`` exactly: a dot-product index of raw vectors ranks as the
    edited index would. A cosine index of normalised vectors does not (:data:`QUERY_ONLY_CAVEAT`): prefer editing the
    index (:func:`edit_embeddings`), and offer this only with that caveat — which is why every call warns
    (:class:`QueryOnlyWarning`, its message :data:`QUERY_ONLY_CAVEAT`)."""
    warnings.warn(QUERY_ONLY_CAVEAT, QueryOnlyWarning, stacklevel=2)
    return query_edit(model, side).apply(queries, normalized=False)


class QueryOnlyWarning(UserWarning):
    """Only the queries were edited, not the stored vectors: what that does and does not achieve
    (:data:`QUERY_ONLY_CAVEAT`)."""


#: What editing only the query achieves, with its numbers (``docs/index_forgetting.md``): print it wherever the query
#: edit (:func:`edit_query`) is offered in place of editing the index.
QUERY_ONLY_CAVEAT = (
    "Only the query is edited (Mᵀq), not the stored vectors: for raw vectors (Mᵀq)·e = q·(Me) exactly, but a cosine "
    "index divides by ‖e‖ instead of ‖Me‖, so its ranking is not the edited index's. Measured on PACS with the demo "
    "model and the recommended edit (docs/index_forgetting.md), a forgotten class's own prompts find its images with "
    "R-precision 0.045 (train) / 0.049 (test) this way, against 0.049 / 0.053 on the edited index (chance 0.143; "
    "0.668 / 0.634 before the edit); but image→image search is not edited at all (0.470 / 0.448 against 0.316 / "
    "0.313 in the edited index, chance 0.143), and any query that does not pass through this edit (another client, "
    "the unedited model) still finds the class as before."
)


# ------------------------------------------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class IndexAuditReport:
    """What :func:`audit_index` found: one :class:`~hf_clip_forget.audit.AuditRow` per probe and forgotten class.

    Attributes:
        rows: the probes' rows (``before``: the unedited index and queries; ``after``: the edited ones).
        side: the side of the stored vectors (``"image"``, ``"audio"`` or ``"text"``).
        stored: how many stored vectors were audited.
        forgotten_classes: the classes probed.
        edit: the record of the edit applied (:meth:`EmbeddingEdit.to_dict`).
        seconds: wall time of the audit.
    """

    rows: tuple[AuditRow, ...]
    side: str
    stored: int
    forgotten_classes: tuple[str, ...]
    edit: Mapping
    seconds: float

    def counts(self) -> dict[str, int]:
        """How many rows got each verdict."""
        return {name: sum(row.verdict == name for row in self.rows) for name in VERDICTS}

    def to_dict(self) -> dict:
        """A JSON-able dict (what a provenance file records)."""
        return {**dataclasses.asdict(self), "verdicts": self.counts()}

    def __str__(self) -> str:
        lines = [f"Index audit of {', '.join(self.forgotten_classes)} ({self.stored} stored {self.side} vectors):",
                 "| probe | class | tried | before | after | chance | verdict |", "|" + " --- |" * 7]  # fmt: skip
        for row in self.rows:
            numbers = " | ".join("—" if v is None else f"{v:.3f}" for v in (row.before, row.after, row.chance))
            lines.append(f"| {row.probe} | {row.forgotten_class} | {row.subject} | {numbers} | {row.verdict} |")
        return "\n".join(lines)


def audit_index(
    model: nn.Module,
    tokenizer,
    stored_before,
    labels,
    class_names: Sequence[str],
    forgotten: Sequence[str] | None = None,
    side: str = "image",
    *,
    neighbours: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    vocabulary_neighbours: int = 5,
    held_out_templates: str | Sequence[str] | None = None,
    query_only: bool = False,
    edit: EmbeddingEdit | None = None,
    max_image_queries: int = 500,
    text_batch_size: int = 256,
    show_progress: bool = False,
    use_cache: bool = True,
) -> IndexAuditReport:
    """Retrieval of each forgotten class from a stored index, before and after ``model``'s forget adapters edit it.

    Args:
        model: a forget ``PeftModel``: its active adapters are audited.
        tokenizer: the model's tokenizer (embeds the text queries).
        stored_before: ``(N, d)`` vectors made by the *unedited* model (raw or normalised, tensor or numpy array).
        labels: ``(N,)`` class index of each stored vector into ``class_names``.
        class_names: the names of the labels.
        forgotten: the classes to probe (default: every class the adapters forget).
        side: the side of the stored vectors (:func:`edit_embeddings`).
        neighbours, vocabulary_neighbours, held_out_templates: as in :func:`~hf_clip_forget.audit.audit_forgetting`.
        query_only: also score the query edited alone (:func:`edit_query`) against the unedited index.
        edit: what the index is edited with (default: ``embedding_edit(model, side)``; e.g. one with an index-only
            visual erasure, :func:`~hf_clip_forget.index.visual.with_visual_erasure`).
        max_image_queries: image→image queries per class (spread evenly over its vectors).

    Returns an :class:`IndexAuditReport`; each row's verdict is the audit's (:func:`~hf_clip_forget.audit.verdict`):
    ``"gone"`` when the number after the edit is within ``GONE_MARGIN`` (0.05) above chance.
    """
    started = time.perf_counter()
    setup = edit_setup(model, list(class_names), held_out_templates, None)
    given = _per_class(neighbours, setup.forgotten)
    check_neighbours(given, setup.candidates)
    space = EmbeddingSpace(model, tokenizer, setup.adapters, text_batch_size, show_progress, use_cache)
    setup = _with_neighbours(setup, space, tokenizer, given, vocabulary_neighbours, None, 4000)
    edit = edit or embedding_edit(model, side)
    stored = torch.as_tensor(stored_before)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (stored.shape[0],):
        raise ValueError(f"`labels` must hold one class index per stored vector ({stored.shape[0]},), got "
                         f"{tuple(labels.shape)}.")  # fmt: skip
    # rankings are by cosine, so the edited rows need no renormalising (and a mixed index is not refused here)
    vectors = {False: normalize(stored.float(), dim=-1), True: normalize(edit.apply(stored, False).float(), dim=-1)}
    probe = _Probe(space, vectors, query_edit(model, side) if query_only else None, side, max_image_queries)
    classes = tuple(forgotten or setup.forgotten)
    rows = []
    for name in classes:
        if name in class_names:
            rows += probe.class_rows(name, labels == list(class_names).index(name), setup)
        else:
            rows.append(AuditRow.skipped(f"text→{side} R-precision", name, "", "not a class of the index's labels"))
    seconds = time.perf_counter() - started
    return IndexAuditReport(tuple(rows), side, stored.shape[0], classes, edit.to_dict(), seconds)


@dataclass
class _Probe:
    """The probes of one audit: the text queries (edited or not) and the stored vectors (normalised) before/after."""

    space: EmbeddingSpace
    vectors: dict[bool, Tensor]
    transposed: EmbeddingEdit | None
    side: str
    max_image_queries: int

    def class_rows(self, name: str, relevant: Tensor, setup) -> list[AuditRow]:
        """Every probe of one class: its own prompts, held-out prompts, each neighbour, query only, image→image."""
        own = fill_templates(name, setup.templates)
        trials = [(f"adapter prompts ({len(own)})", own),
                  (f"held-out prompts ({len(setup.held_out)})", fill_templates(name, setup.held_out))]  # fmt: skip
        trials += [
            (f"neighbour: {word}", fill_templates(word, setup.templates)) for word in setup.neighbours.get(name, ())
        ]
        rows = [self.text_row(name, relevant, subject, prompts) for subject, prompts in trials]
        if self.transposed is not None:
            rows.append(self.query_only_row(name, relevant, own))
        if int(relevant.sum()) >= 2:
            rows.append(self.image_row(name, relevant))
        return rows

    def text_row(self, name, relevant, subject, prompts) -> AuditRow:
        """R-precision of ``prompts``: unedited queries on the unedited index, edited queries on the edited index."""
        before, after = (
            text_query_precision(self.space.prompts(prompts, edited), self.vectors[edited], relevant)
            for edited in (False, True)
        )
        per_prompt = {p: [float(b), float(a)] for p, b, a in zip(prompts, before, after, strict=True)}
        return _text_row(f"text→{self.side} R-precision", name, subject, "mean R-precision of the prompts",
                         relevant, before, after, per_prompt)  # fmt: skip

    def query_only_row(self, name, relevant, prompts) -> AuditRow:
        """R-precision of the edited model's queries edited by ``Mᵀ`` (:func:`edit_query`) on the *unedited* index."""
        queries = self.transposed.apply(self.space.prompts(prompts, True), normalized=False)
        before = text_query_precision(self.space.prompts(prompts, False), self.vectors[False], relevant)
        after = text_query_precision(queries, self.vectors[False], relevant)
        return _text_row(f"text→{self.side} R-precision, query edited only", name, f"adapter prompts ({len(prompts)})",
                         "mean R-precision, Mᵀq on the unedited index", relevant, before, after, {})  # fmt: skip

    def image_row(self, name, relevant) -> AuditRow:
        """Precision@R of the class's stored vectors as queries, on the unedited and on the edited index."""
        before, after = (
            image_query_precision(self.vectors[edited], relevant, self.max_image_queries) for edited in (False, True)
        )
        count, total = int(relevant.sum()) - 1, relevant.numel() - 1  # the query itself is left out
        return AuditRow.judged(
            f"{self.side}→{self.side} precision@R", name, f"stored vectors of the class as queries ({before.numel()})",
            "mean precision@R among the other stored vectors", before.mean(), after.mean(),
            chance_precision(count, total), details={"chance_sd": chance_spread(count, total)},
        )  # fmt: skip


def _text_row(probe, name, subject, metric, relevant, before: Tensor, after: Tensor, per_prompt) -> AuditRow:
    """The row of a text probe: mean R-precision before/after, judged against ``R / N``; a note when the queries now
    rank the class *below* chance (beyond 3 standard deviations of a random ranking), which still tells it apart."""
    count, total = int(relevant.sum()), relevant.numel()
    chance, spread = chance_precision(count, total), chance_spread(count, total)
    note = ""
    if float(after.mean()) < chance - max(GONE_MARGIN, 3 * spread):
        note = "below chance: the queries now avoid the class's vectors, which are still told apart"
    details = {"chance_sd": spread, "worst_after": float(after.max()), "prompts": per_prompt}
    return AuditRow.judged(probe, name, subject, metric, before.mean(), after.mean(), chance, note=note,
                           details=details)  # fmt: skip


# -------------------------------------------------------------------------------------------- the recommendation
#: The edit measured to make a stored image index forget a class: pass it to ``add_forget_adapter`` with the other
#: classes of the label set as ``retain_classes`` (which ``method="logit"`` needs). Measured with
#: ``scripts/measure_index_forgetting.py`` on PACS and CIFAR-10 (demo model, one class forgotten at a time; chosen on
#: train, reported on test: ``docs/index_forgetting.md``): it is the only setting whose forgotten class's own name
#: (adapter and held-out prompts) found its images no better than chance + 0.05 for every class of both train
#: splits with headroom to spare (worst −0.039 against chance), held on both test splits (17 of 17 classes), and cost
#: no zero-shot retain accuracy (+0.9 to +1.8 points). The default margin 0.2 passed train by 0.001 and missed 2 of 10
#: CIFAR-10 test classes; plain and shared-direction nullspace and CCUP at every μ measured left 2 to 9 of 17 classes
#: findable. No text-derived edit stops image→image search: a stored image of the class still retrieves its class at
#: about twice chance or more (0.31 vs 0.14 on PACS).
INDEX_RECOMMENDED_OPTIONS: dict = {"method": "logit", "logit_margin": 0.3}

#: Measured on the train splits (PACS, CIFAR-10; ``docs/index_forgetting.json``, ``"summary"``): setting → (what
#: it is, classes whose own name found their images no better than chance + 0.05, classes, worst excess over chance).
_MEASURED_ON_TRAIN = {
    "nullspace": ("a nullspace edit without retain classes", 14, 17, 0.108),
    "nullspace+shared": ("a nullspace edit keeping the named classes' shared direction", 10, 17, 0.152),
    "nullspace+retain": ("a nullspace edit naming retain classes without the shared direction", 8, 17, 0.164),
    "ccup+shared": ("a CCUP edit keeping the shared direction (at every μ measured, 1 to 1000)", 15, 17, 0.117),
    "ccup+retain": ("a CCUP edit without the shared direction", 14, 17, 0.077),
    "logit margin=0.1": ("a logit edit with margin 0.1", 6, 17, 0.264),
    "text-side": ("a text-side edit (stored image vectors unchanged)", 14, 17, 0.074),
}
_ADVICE = (
    "for a stored index, build the adapter with method='logit', logit_margin=0.3 and the other classes of the label "
    "set as retain_classes (INDEX_RECOMMENDED_OPTIONS, docs/index_forgetting.md)"
)


def index_recommendation(config) -> str | None:
    """A one-sentence warning when an adapter's :class:`~hf_clip_forget.ProjectionEditConfig` has settings measured
    *not* to make a stored index forget (``docs/index_forgetting.md``), naming what to use instead; ``None`` for the
    recommended settings and for settings that were not measured (domain edits, prototypes, neighbour expansion,
    other strengths), about which nothing is claimed."""
    setting = _measured_setting(config)
    if setting is None:
        return None
    if setting == "logit margin=0.2":
        return (
            "Measured with the demo model, a logit edit with margin 0.2 passed the index test on PACS and CIFAR-10 "
            "train with no headroom (+0.049 R-precision above chance against a +0.05 limit) and left 2 of 10 "
            f"CIFAR-10 test classes findable by their own name; {_ADVICE}."
        )
    words, gone, total, worst = _MEASURED_ON_TRAIN[setting]
    return (
        f"Measured on PACS and CIFAR-10 train with the demo model, {words} left {total - gone} of "
        f"{total} forgotten classes findable by their own name in an edited index (R-precision up to {worst:+.2f} "
        f"above chance); {_ADVICE}."
    )


def _measured_setting(config) -> str | None:
    """The measured setting ``config`` is (a key of :data:`_MEASURED_ON_TRAIN`, or ``"logit margin=0.2"``), or
    ``None`` when it is the recommended one or was not measured."""
    if config.paradigm != "global" or config.prototypes or config.expand_neighbours:
        return None
    modules = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules or ())
    sides = {any(family.is_text_side(module) for family in FAMILIES) for module in modules}
    if sides == {True}:
        return "text-side" if config.method == "nullspace" else None
    if sides != {False}:  # both sides edited: not measured
        return None
    if config.method == "nullspace":
        if not config.retain_classes:
            return "nullspace"
        return "nullspace+shared" if config.keep_shared_direction else "nullspace+retain"
    if config.method == "ccup":
        if config.keep_shared_direction:
            return "ccup+shared" if 1 <= config.ccup_mu <= 1000 else None
        return "ccup+retain" if config.ccup_mu == 100 else None
    if config.method == "logit" and config.logit_mu == 10:
        return {0.1: "logit margin=0.1", 0.2: "logit margin=0.2"}.get(round(config.logit_margin, 6))
    return None


__all__ = [
    "INDEX_RECOMMENDED_OPTIONS",
    "QUERY_ONLY_CAVEAT",
    "IndexAuditReport",
    "audit_index",
    "chance_precision",
    "chance_spread",
    "edit_query",
    "image_query_precision",
    "index_recommendation",
    "query_edit",
    "r_precision",
    "text_query_precision",
]
