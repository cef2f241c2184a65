"""The trade-off picture of a calibration: forget accuracy against retain drop over the strengths tried, the budget as
a shaded corner, the unedited model and the chosen strength marked."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .report import CalibrationReport


def plot_tradeoff(report: CalibrationReport, path: str | os.PathLike) -> None:
    """Save the picture of ``report`` to ``path`` (any format matplotlib writes, by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.calibration import format_strength

    budget = report.budget
    figure, axis = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    drops = [100 * c.retain_drop for c in report.candidates]
    forgets = [100 * c.forget_accuracy for c in report.candidates]
    lambdas = sorted({c.strength.get("ccup_lambda") for c in report.candidates}, key=lambda v: (v is None, v))
    for lam in lambdas:  # one curve per λ (a single one for nullspace)
        rows = [(d, f) for d, f, c in zip(drops, forgets, report.candidates, strict=True)
                if c.strength.get("ccup_lambda") == lam]  # fmt: skip
        label = "strengths tried" + (f" (λ = {lam:g})" if lam is not None and len(lambdas) > 1 else "")
        axis.plot([r[0] for r in rows], [r[1] for r in rows], "o-", ms=3.5, lw=1, label=label)
    low = min([0.0, *drops]) - 1
    axis.axvline(100 * budget.max_retain_drop, color="#2e7d32", ls="--", lw=1, label="budget")
    axis.axhline(100 * budget.max_forget, color="#2e7d32", ls="--", lw=1)
    axis.fill_between([low, 100 * budget.max_retain_drop], -2, 100 * budget.max_forget, color="#2e7d32", alpha=0.15,
                      label="within budget")  # fmt: skip
    axis.plot([0], [100 * report.forget_accuracy.before], "s", color="#616161", label="unedited")
    chosen = report.chosen
    marker_colour = "#2e7d32" if report.budget_met else "#c62828"
    axis.plot([100 * chosen.retain_drop], [100 * chosen.forget_accuracy], "*", ms=16, color=marker_colour,
              label=f"chosen: {format_strength(dict(chosen.strength))}")  # fmt: skip
    axis.set_xlim(low, max([100 * budget.max_retain_drop, *drops]) + 1)
    axis.set_ylim(-2, 102)
    axis.set_xlabel("retain drop on kept images (points)")
    axis.set_ylabel("forget accuracy (%)")
    met = "budget met" if report.budget_met else "BUDGET NOT MET"
    axis.set_title(f"Calibrating {', '.join(report.classes)} ({report.method}): {met}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(os.fspath(path))
    plt.close(figure)
