"""The trade-off picture of a calibration: forget accuracy against the change of retain accuracy over the strengths
tried, each point labelled with its strength, the budget as a shaded corner, the unedited model and the chosen
strength marked.

The horizontal axis is the *change* of accuracy on the kept images in points (after minus before: negative is
collateral damage, positive an improvement, 0 the unedited model, drawn as a line), so that it reads as accuracy
does; the budget allows changes down to ``−max_retain_drop``. The legend sits below the axes, over no point.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .report import CalibrationReport

#: gid of the strength labels (``axis.texts``), for tests and for anyone restyling the figure.
STRENGTH_LABEL = "strength label"


def plot_tradeoff(report: CalibrationReport, path: str | os.PathLike) -> None:
    """Save the picture of ``report`` to ``path`` (any format matplotlib writes, by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.calibration import format_strength

    budget = report.budget
    figure, axis = plt.subplots(figsize=(7.0, 5.2), dpi=120, layout="constrained")
    changes = [-100 * c.retain_drop for c in report.candidates]
    forgets = [100 * c.forget_accuracy for c in report.candidates]
    lambdas = sorted({c.strength.get("ccup_lambda") for c in report.candidates}, key=lambda v: (v is None, v))
    floor = -100 * budget.max_retain_drop
    low, high = min([floor, *changes]) - 1, max([0.0, *changes]) + 1
    axis.axvline(0, color="#424242", lw=0.8, zorder=1)  # the unedited model's retain accuracy
    axis.axvline(floor, color="#2e7d32", ls="--", lw=1, label="budget")
    axis.axhline(100 * budget.max_forget, color="#2e7d32", ls="--", lw=1)
    axis.fill_between([floor, high], -2, 100 * budget.max_forget, color="#2e7d32", alpha=0.15, label="within budget")
    labels = []
    for lam in lambdas:  # one curve per λ (a single one for nullspace)
        rows = [(x, y, c) for x, y, c in zip(changes, forgets, report.candidates, strict=True)
                if c.strength.get("ccup_lambda") == lam]  # fmt: skip
        label = "strengths tried" + (f" (λ = {lam:g})" if lam is not None and len(lambdas) > 1 else "")
        (curve,) = axis.plot([r[0] for r in rows], [r[1] for r in rows], "o-", ms=3.5, lw=1, label=label, zorder=3)
        for x, y, candidate in rows:
            shown = {k: v for k, v in candidate.strength.items() if not (k == "ccup_lambda" and len(lambdas) > 1)}
            text = format_strength(shown or dict(candidate.strength)).replace(" = ", "=")
            # the chosen strength's label above left of its star, clear of it and of the curve's next points
            offset, align = ((-7, 7), "right") if candidate == report.chosen else ((4, 3), "left")
            labels.append(axis.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=6.5,
                                        ha=align, color=curve.get_color(), gid=STRENGTH_LABEL, zorder=6))  # fmt: skip
    axis.plot([0], [100 * report.forget_accuracy.before], "s", color="#616161", label="unedited", zorder=3)
    chosen = report.chosen
    marker_colour = "#2e7d32" if report.budget_met else "#c62828"
    axis.plot([-100 * chosen.retain_drop], [100 * chosen.forget_accuracy], "*", ms=16, color=marker_colour,
              label=f"chosen: {format_strength(dict(chosen.strength))}", zorder=5)  # fmt: skip
    axis.set_xlim(low, high)
    axis.set_ylim(-2, 102)
    axis.set_xlabel("retain accuracy change on kept images (points; negative: collateral damage)")
    axis.set_ylabel("forget accuracy (%)")
    met = "budget met" if report.budget_met else "BUDGET NOT MET"
    axis.set_title(f"Calibrating {', '.join(report.classes)} ({report.method}): {met}", fontsize=10)
    axis.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    _declutter(figure, labels, keep=(-100 * chosen.retain_drop, 100 * chosen.forget_accuracy))
    figure.savefig(os.fspath(path))
    plt.close(figure)


def _declutter(figure, labels, keep: tuple[float, float]) -> None:
    """Hide a strength label that would overlap one already shown: the chosen strength's first, then in the order
    tried (weakest first). A hidden label's point lies between shown ones on the same curve."""
    renderer = figure.canvas.get_renderer()
    figure.draw_without_rendering()  # settle the layout, so that the labels' boxes are final
    order = sorted(labels, key=lambda label: label.xy != keep)  # stable: the chosen one first, then as tried
    shown = []
    for label in order:
        box = label.get_window_extent(renderer)
        if any(box.overlaps(other) for other in shown):
            label.set_visible(False)
        else:
            shown.append(box)
