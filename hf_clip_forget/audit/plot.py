"""A before/after picture of an audit: one panel per probe, a pair of bars per row, chance as a dashed line."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .report import AuditReport

_COLOURS = {"gone": "#2e7d32", "reduced": "#f9a825", "leaks": "#c62828", "unchanged (expected)": "#757575"}


def plot_report(report: AuditReport, path: str | os.PathLike) -> None:
    """Save the picture of ``report`` to ``path`` (any format matplotlib writes, by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = report.probes_run
    if not probes:
        raise ValueError("The audit has no probe with numbers to plot (every probe was skipped).")
    figure, axes = plt.subplots(len(probes), 1, figsize=(9, 2.2 + 0.45 * len(report.rows)), squeeze=False)
    for axis, probe in zip(axes[:, 0], probes, strict=True):
        rows = [row for row in report.rows if row.probe == probe and row.verdict != "skipped"]
        labels = [f"{row.forgotten_class}: {row.subject}" for row in rows]
        positions = range(len(rows))
        axis.barh([p + 0.2 for p in positions], [row.before for row in rows], height=0.4, color="#90a4ae",
                  label="before")  # fmt: skip
        axis.barh([p - 0.2 for p in positions], [row.after for row in rows], height=0.4,
                  color=[_COLOURS[row.verdict] for row in rows], label="after (colour: verdict)")  # fmt: skip
        for p, row in zip(positions, rows, strict=True):
            axis.plot([row.chance, row.chance], [p - 0.45, p + 0.45], "k--", linewidth=0.8)
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.set_title(f"{probe} — {rows[0].metric}", fontsize=9, loc="left")
        axis.invert_yaxis()
    axes[0, 0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Audit of {', '.join(report.forgotten_classes)} (dashed: chance)", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=110)
    plt.close(figure)
