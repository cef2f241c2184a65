"""The audit's result: one row per probe and forgotten class, its number before and after the edit, a plain verdict.

Verdicts compare the number after the edit with the number before and with what chance gives:

- ``"gone"`` — after the edit the probe does no better than chance (within ``GONE_MARGIN`` of it);
- ``"reduced"`` — above chance, but less than half of what was above chance before is left;
- ``"leaks"`` — half or more of the above-chance signal is still there;
- ``"unchanged (expected)"`` — a probe of what the edit does not touch by construction (the towers' features);
- ``"skipped"`` — the probe could not run; ``note`` says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


#: How far above chance a number may stay for the class to count as gone (rates and balanced accuracies in [0, 1]).
GONE_MARGIN = 0.05
#: Share of the above-chance signal that, if still there after the edit, counts as a leak.
LEAK_SHARE = 0.5
VERDICTS = ("gone", "reduced", "leaks", "unchanged (expected)", "skipped")


def verdict(
    before: float, after: float, chance: float, higher_is_recognised: bool = True, tolerance: float = GONE_MARGIN
) -> str:
    """The verdict of a probe whose number is ``before``/``after`` the edit and ``chance`` for a class the model does
    not recognise; ``tolerance`` is how far beyond chance still counts as gone (for a rank, where lower means better
    recognised, pass ``higher_is_recognised=False``)."""
    sign = 1.0 if higher_is_recognised else -1.0
    above_before, above_after = sign * (before - chance), sign * (after - chance)
    if above_after <= tolerance:
        return "gone"
    if above_before > 0 and above_after < LEAK_SHARE * above_before:
        return "reduced"
    return "leaks"


@dataclass(frozen=True)
class AuditRow:
    """One probe of one forgotten class.

    Attributes:
        probe: which probe (``"held-out prompts"``, ``"neighbour name"``, ``"logit margin"``, ``"zero-shot with
            neighbours"``, ``"image→text rank"``, ``"text→image R-precision"``, ``"linear probe"``, …).
        forgotten_class: the class the probe tries to get back.
        subject: what was tried (a neighbour name, ``"20 held-out templates"``, ``"edited embeddings"``).
        metric: what the numbers are, in words.
        before, after: the number with the adapters disabled and active (``None`` when skipped).
        chance: what the number is for a class the model does not recognise.
        verdict: one of :data:`VERDICTS`.
        note: why a probe was skipped, or what the number means when that is not obvious.
        details: per-template or per-name numbers behind the row (JSON-able).
    """

    probe: str
    forgotten_class: str
    subject: str
    metric: str
    before: float | None
    after: float | None
    chance: float | None
    verdict: str
    note: str = ""
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"`verdict` must be one of {VERDICTS}, got {self.verdict!r}.")

    @classmethod
    def skipped(cls, probe: str, forgotten_class: str, subject: str, why: str) -> AuditRow:
        """A row for a probe that could not run, saying why."""
        return cls(probe, forgotten_class, subject, "", None, None, None, "skipped", note=why)

    @classmethod
    def judged(cls, probe, forgotten_class, subject, metric, before, after, chance, higher_is_recognised=True,
               tolerance=GONE_MARGIN, **extra) -> AuditRow:  # fmt: skip
        """A row whose verdict follows from its numbers (:func:`verdict`)."""
        label = verdict(before, after, chance, higher_is_recognised, tolerance)
        return cls(probe, forgotten_class, subject, metric, float(before), float(after), float(chance), label, **extra)


#: What a forget adapter does not remove, stated in every report and card.
NOT_REMOVED = (
    "The edit changes only the layers that produce the joint embeddings; the vision and text towers' internal "
    "features are untouched, so anything that reads them (a probe on tower features, a model fine-tuned from the "
    "towers) still sees the class (see the linear probe on tower features when data was given).",
    "Unmerging, disabling or deleting the adapter restores the class exactly: the base weights are kept.",
    "Only what the probes measured is claimed: names, prompts and images they did not try are not covered.",
)


@dataclass(frozen=True)
class AuditReport:
    """What :func:`~hf_clip_forget.audit.audit_forgetting` found.

    Attributes:
        rows: one :class:`AuditRow` per probe and forgotten class.
        forgotten_classes: the classes the audited adapters forget.
        adapters: the adapters that were active.
        candidate_classes: the other class names a forgotten class had to beat.
        data: a short description of the labelled images used (``None`` when the audit was data-free).
        seconds: wall time of the audit.
        not_removed: what the edit does not remove (:data:`NOT_REMOVED`).
    """

    rows: tuple[AuditRow, ...]
    forgotten_classes: tuple[str, ...]
    adapters: tuple[str, ...]
    candidate_classes: tuple[str, ...]
    data: str | None
    seconds: float
    not_removed: tuple[str, ...] = NOT_REMOVED

    @property
    def probes_run(self) -> tuple[str, ...]:
        """The probes that produced numbers, in order."""
        return tuple(dict.fromkeys(row.probe for row in self.rows if row.verdict != "skipped"))

    @property
    def leaks(self) -> tuple[AuditRow, ...]:
        """The rows whose verdict is ``"leaks"``."""
        return tuple(row for row in self.rows if row.verdict == "leaks")

    def counts(self) -> dict[str, int]:
        """How many rows got each verdict."""
        return {name: sum(row.verdict == name for row in self.rows) for name in VERDICTS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (:meth:`from_dict` reads it back)."""
        data = asdict(self)
        data["rows"] = [asdict(row) for row in self.rows]
        data["verdicts"] = self.counts()
        data["probes_run"] = list(self.probes_run)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        """The report :meth:`to_dict` wrote."""
        try:
            rows = tuple(AuditRow(**row) for row in data["rows"])
            return cls(
                rows=rows,
                forgotten_classes=tuple(data["forgotten_classes"]),
                adapters=tuple(data["adapters"]),
                candidate_classes=tuple(data["candidate_classes"]),
                data=data.get("data"),
                seconds=float(data["seconds"]),
                not_removed=tuple(data.get("not_removed", NOT_REMOVED)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"Not an audit report written by `AuditReport.to_dict`: {error}.") from error

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AuditReport:
        """Read a report written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def table(self) -> str:
        """The rows as a Markdown table."""
        lines = ["| probe | class | tried | metric | before | after | chance | verdict |", "|" + " --- |" * 8]
        for row in self.rows:
            numbers = [_number(value) for value in (row.before, row.after, row.chance)]
            metric = row.metric if row.verdict != "skipped" else f"skipped: {row.note}"
            lines.append(
                f"| {row.probe} | {row.forgotten_class} | {row.subject} | {metric} | "
                + " | ".join(numbers)
                + f" | {row.verdict} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        counts = ", ".join(f"{count} {name}" for name, count in self.counts().items() if count)
        source = f"with {self.data}" if self.data else "data-free"
        return (
            f"Audit of {', '.join(self.forgotten_classes)} ({source}; {self.seconds:.1f} s): {counts}\n\n"
            + self.table()
        )

    def plot(self, path: str | os.PathLike) -> None:
        """Save a before/after bar chart of every row that has numbers (one panel per probe)."""
        from .plot import plot_report

        plot_report(self, path)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


__all__ = ["GONE_MARGIN", "LEAK_SHARE", "NOT_REMOVED", "VERDICTS", "AuditReport", "AuditRow", "verdict"]
