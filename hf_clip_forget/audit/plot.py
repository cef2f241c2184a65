"""A before/after picture of an audit: one panel per probe, a pair of bars per row, chance as a dashed line.

The "after" bar of each row is coloured by its verdict; the legend (below the panels, never over a bar) has one entry
per verdict present, in that verdict's colour.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .report import AuditReport

_COLOURS = {"gone": "#2e7d32", "reduced": "#f9a825", "leaks": "#c62828", "unchanged (expected)": "#757575"}
_BEFORE = "#b0bec5"  # paler than the grey of "unchanged (expected)"


def verdict_colour(verdict: str) -> str:
    """The colour of an "after" bar with this verdict."""
    return _COLOURS[verdict]


def plot_report(report: AuditReport, path: str | os.PathLike) -> None:
    """Save the picture of ``report`` to ``path`` (any format matplotlib writes, by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    probes = report.probes_run
    if not probes:
        raise ValueError("The audit has no probe with numbers to plot (every probe was skipped).")
    figure, axes = plt.subplots(
        len(probes), 1, figsize=(9, 2.6 + 0.45 * len(report.rows)), squeeze=False, layout="constrained"
    )
    verdicts = []
    for axis, probe in zip(axes[:, 0], probes, strict=True):
        rows = [row for row in report.rows if row.probe == probe and row.verdict != "skipped"]
        labels = [f"{row.forgotten_class}: {row.subject}" for row in rows]
        positions = range(len(rows))
        axis.barh([p + 0.2 for p in positions], [row.before for row in rows], height=0.4, color=_BEFORE)
        axis.barh([p - 0.2 for p in positions], [row.after for row in rows], height=0.4,
                  color=[_COLOURS[row.verdict] for row in rows])  # fmt: skip
        for p, row in zip(positions, rows, strict=True):
            axis.plot([row.chance, row.chance], [p - 0.45, p + 0.45], "k--", linewidth=0.8)
        verdicts += [row.verdict for row in rows]
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.set_title(f"{probe} — {rows[0].metric}", fontsize=9, loc="left")
        axis.invert_yaxis()
    present = [verdict for verdict in _COLOURS if verdict in verdicts]  # the verdicts' own order
    handles = [Patch(color=_BEFORE, label="before the edit")]
    handles += [Patch(color=_COLOURS[verdict], label=f"after: {verdict}") for verdict in present]
    handles.append(Line2D([], [], color="k", linestyle="--", linewidth=0.8, label="chance"))
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(f"Audit of {', '.join(report.forgotten_classes)}: before and after the edit", fontsize=10)
    figure.savefig(os.fspath(path), dpi=110)
    plt.close(figure)
