"""The result of a calibration: the budget, every strength tried, the one chosen, and the validation numbers before and
after the edit — per group, per class and per (domain, class) cell — with the size and hash of the validation set.

``CalibrationReport.to_dict()`` is also the record an adapter's config keeps (``ProjectionEditConfig.calibration``,
checked on load by :func:`hf_clip_forget.core.calibration.check_calibration_record`) and its card shows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..core.calibration import (
    CHOICES,
    DATA_ASSISTED,
    RECORD_FORMAT,
    CalibrationBudget,
    Candidate,
    check_calibration_record,
    format_strength,
)


@dataclass(frozen=True)
class BeforeAfter:
    """An accuracy before and after the edit (fractions in [0, 1])."""

    before: float
    after: float


@dataclass(frozen=True)
class GroupAccuracy:
    """Accuracy of one class or one (domain, class) cell (``"sketch/dog"``) before and after the edit.

    ``group``: ``"forget"`` (the edit must forget it), ``"kept"`` (it must keep it) or ``"other"`` (neither; for a
    class: one forgotten only in some domains)."""

    name: str
    group: str
    images: int
    before: float
    after: float


@dataclass(frozen=True)
class ValidationSet:
    """The validation set's size and identity (never its images).

    ``sha256`` is a hash of ``hashed`` (its image bytes, labels and domains; or, when cached features were given,
    those features)."""

    num_images: int
    forget_images: int
    kept_images: int
    sha256: str
    hashed: str


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`~hf_clip_forget.calibration.calibrate_forget_adapter` tried and chose.

    Attributes:
        adapter: the name of the adapter written.
        classes, retain_classes, domains, retain_domains, paradigm, method: the edit.
        budget: the :class:`~hf_clip_forget.core.calibration.CalibrationBudget`.
        budget_met: whether the chosen strength meets it on the validation set.
        choice: which rule chose (a key of ``hf_clip_forget.core.calibration.CHOICES``; :attr:`choice_text`).
        searched: the config fields searched (``("alpha",)`` or ``("ccup_lambda", "ccup_mu")``).
        chosen: the chosen :class:`~hf_clip_forget.core.calibration.Candidate`.
        candidates: every candidate tried, weakest first.
        forget_accuracy, kept_accuracy: pooled over the forgotten / kept images, before and after the chosen edit.
        per_class, per_cell: :class:`GroupAccuracy` rows (cells only when the data has domains).
        validation: the :class:`ValidationSet`.
        seconds: wall time of the calibration (image features included).
        classifier: the templates of the zero-shot classifier that judged every strength, in words.
    """

    adapter: str
    classes: tuple[str, ...]
    retain_classes: tuple[str, ...]
    domains: tuple[str, ...]
    retain_domains: tuple[str, ...]
    paradigm: str
    method: str
    budget: CalibrationBudget
    budget_met: bool
    choice: str
    searched: tuple[str, ...]
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    forget_accuracy: BeforeAfter
    kept_accuracy: BeforeAfter
    per_class: tuple[GroupAccuracy, ...]
    per_cell: tuple[GroupAccuracy, ...]
    validation: ValidationSet
    seconds: float
    classifier: str = "imagenet (80 templates)"

    @property
    def retain_drop(self) -> float:
        """The drop the budget bounds (fraction; 0.01 = one point): kept accuracy before minus after, or for a domain
        edit the larger drop of its two kept groups (``chosen.drop_group``)."""
        return self.chosen.retain_drop

    @property
    def choice_text(self) -> str:
        return CHOICES[self.choice]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record (also kept in the adapter's config); :meth:`from_dict` reads it back."""
        return {
            "format": RECORD_FORMAT,
            "adapter": self.adapter,
            "classes": list(self.classes),
            "retain_classes": list(self.retain_classes),
            "method": self.method,
            "paradigm": self.paradigm,
            "domains": list(self.domains),
            "retain_domains": list(self.retain_domains),
            "budget": self.budget.to_dict(),
            "budget_met": self.budget_met,
            "choice": self.choice,
            "searched": list(self.searched),
            "chosen": dict(self.chosen.strength),
            "candidates": [candidate.to_dict(self.budget) for candidate in self.candidates],
            "forget_accuracy": vars(self.forget_accuracy).copy(),
            "kept_accuracy": vars(self.kept_accuracy).copy(),
            "per_class": [vars(row).copy() for row in self.per_class],
            "per_cell": [vars(row).copy() for row in self.per_cell],
            "validation": vars(self.validation).copy(),
            "seconds": self.seconds,
            "classifier": self.classifier,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        """The report :meth:`to_dict` wrote (checked: a ``ValueError`` on anything else)."""
        check_calibration_record(data)
        if not data:
            raise ValueError("The calibration record is empty: the adapter was not calibrated.")
        candidates = tuple(
            Candidate(
                dict(c["strength"]),
                c["forget_accuracy"],
                c["kept_accuracy"],
                c["retain_drop"],
                c.get("drop_group", "kept"),
            )  # fmt: skip
            for c in data["candidates"]
        )
        return cls(
            adapter=data["adapter"],
            classes=tuple(data["classes"]),
            retain_classes=tuple(data["retain_classes"]),
            domains=tuple(data["domains"]),
            retain_domains=tuple(data["retain_domains"]),
            paradigm=data["paradigm"],
            method=data["method"],
            budget=CalibrationBudget.of(data["budget"]),
            budget_met=data["budget_met"],
            choice=data["choice"],
            searched=tuple(data["searched"]),
            chosen=next(c for c in candidates if c.strength == data["chosen"]),
            candidates=candidates,
            forget_accuracy=BeforeAfter(**data["forget_accuracy"]),
            kept_accuracy=BeforeAfter(**data["kept_accuracy"]),
            per_class=tuple(GroupAccuracy(**row) for row in data["per_class"]),
            per_cell=tuple(GroupAccuracy(**row) for row in data["per_cell"]),
            validation=ValidationSet(**data["validation"]),
            seconds=float(data["seconds"]),
            # records written before the classifier was recorded were judged with the adapter's own templates
            classifier=data.get("classifier", "the adapter's own templates"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationReport:
        """Read a report written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    # ------------------------------------------------------------------------------------------- text
    def verdict(self) -> str:
        """One plain line: whether the budget is met, and the numbers."""
        forget, kept, budget = self.forget_accuracy, self.kept_accuracy, self.budget
        numbers = (
            f"forget accuracy {_pct(forget.before)} → {_pct(forget.after)} (budget ≤ {_pct(budget.max_forget)}), "
            f"kept accuracy {_pct(kept.before)} → {_pct(kept.after)}, {_drop(self.retain_drop)}"
            + (f" of the {self.chosen.drop_group}" if self.chosen.drop_group != "kept" else "")
            + f" (budget ≤ {_points(budget.max_retain_drop)}"
            + (
                ", for the kept classes and for the forgotten classes in the kept domains, each)"
                if self.paradigm == "domain"
                else ")"
            )
        )
        head = "budget met" if self.budget_met else "BUDGET NOT MET"
        return f"{head} with {format_strength(dict(self.chosen.strength))}: {numbers}."

    def table(self) -> str:
        """The per-class and per-cell numbers as Markdown tables."""
        lines = []
        for title, rows in (("class", self.per_class), ("domain/class", self.per_cell)):
            if not rows:
                continue
            lines += [
                f"| {title} | role | images | before | after | change |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
            ]
            lines += [
                f"| {row.name} | {row.group} | {row.images} | {_pct(row.before)} | {_pct(row.after)} | "
                f"{100 * (row.after - row.before):+.1f} |"
                for row in rows
            ]
            lines.append("")
        return "\n".join(lines).rstrip()

    def __str__(self) -> str:
        where = "everywhere" if self.paradigm == "global" else f"in {', '.join(self.domains)} ({self.paradigm})"
        tried = len(self.candidates)
        return (
            f"Calibration of {', '.join(self.classes)} {where}, {self.method}: {tried} strengths tried on "
            f"{self.validation.num_images} validation images ({self.seconds:.1f} s).\n"
            f"{self.verdict()}\nJudged by zero-shot classification with {self.classifier}. How the strength was "
            f"chosen: {self.choice_text}.\n{DATA_ASSISTED}\n\n{self.table()}"
        )

    def plot(self, path: str | os.PathLike) -> None:
        """Save the trade-off curve (forget accuracy against retain drop over the strengths tried), with the budget
        drawn and the chosen strength marked."""
        from .plot import plot_tradeoff

        plot_tradeoff(self, path)


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _points(value: float) -> str:
    return f"{100 * value:.1f} points"


def _drop(value: float) -> str:
    """A retain drop in words: ``"drop 1.0 points"``, or for a negative drop (the kept images gained)
    ``"gain +1.0 points"``."""
    return f"gain +{_points(-value)}" if round(100 * value, 1) < 0 else f"drop {_points(max(value, 0.0))}"


__all__ = ["DATA_ASSISTED", "BeforeAfter", "CalibrationReport", "GroupAccuracy", "ValidationSet", "format_strength"]
