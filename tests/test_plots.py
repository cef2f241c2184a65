"""The pictures a person reads (issue 21): the audit's legend has one entry per verdict colour present, each
calibration point is labelled with its strength on an axis of retain accuracy *change*, and no legend covers a data
point (audit bars, calibration and sweep points)."""

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from hf_clip_forget.audit.plot import verdict_colour  # noqa: E402
from hf_clip_forget.audit.report import AuditReport, AuditRow  # noqa: E402
from hf_clip_forget.calibration.plot import STRENGTH_LABEL  # noqa: E402
from hf_clip_forget.calibration.report import BeforeAfter, CalibrationReport, ValidationSet  # noqa: E402
from hf_clip_forget.core.calibration import CalibrationBudget, Candidate, format_strength  # noqa: E402


def audit_report(verdicts=("gone", "reduced", "leaks", "gone", "leaks", "unchanged (expected)")) -> AuditReport:
    probes = ["held-out prompts", "held-out prompts", "other names", "other names", "linear probe", "linear probe"]
    rows = tuple(
        AuditRow(probe, "dog", f"subject {i}", "top-1 rate", 0.9 - 0.1 * i, 0.05 + 0.1 * i, 0.1, verdict)
        for i, (probe, verdict) in enumerate(zip(probes, verdicts, strict=True))
    )
    return AuditReport(rows=rows, forgotten_classes=("dog",), adapters=("default",), candidate_classes=("cat",),
                       data=None, seconds=1.0)  # fmt: skip


def calibration_report(method: str = "nullspace") -> CalibrationReport:
    """Forget accuracy falling with the strength, kept accuracy first improving (a negative drop), then dropping."""
    budget = CalibrationBudget(max_forget=0.05, max_retain_drop=0.01)
    if method == "nullspace":
        strengths = [{"alpha": a} for a in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)]
        levels = [s["alpha"] for s in strengths]
    else:
        strengths = [
            {"ccup_lambda": lam, "ccup_mu": mu} for lam in (100.0, 1000.0) for mu in (300.0, 100.0, 30.0, 10.0)
        ]
        levels = [{300.0: 0.2, 100.0: 0.5, 30.0: 0.8, 10.0: 1.0}[s["ccup_mu"]] * (0.8 + s["ccup_lambda"] / 5000)
                  for s in strengths]  # fmt: skip
    candidates = tuple(
        Candidate(strength, 0.70 * (1 - min(level, 1.0)) ** 2 + 0.01, 0.9, -0.004 + 0.012 * level**3)
        for strength, level in zip(strengths, levels, strict=True)
    )
    chosen = next(c for c in candidates if c.meets(budget))
    return CalibrationReport(
        adapter="default", classes=("dog",), retain_classes=("cat",), domains=(), retain_domains=(),
        paradigm="global", method=method, budget=budget, budget_met=True, choice="met",
        searched=tuple(strengths[0]), chosen=chosen, candidates=candidates,
        forget_accuracy=BeforeAfter(0.71, chosen.forget_accuracy), kept_accuracy=BeforeAfter(0.9, 0.9),
        per_class=(), per_cell=(), validation=ValidationSet(100, 40, 60, "0" * 64, "images"), seconds=1.0,
    )  # fmt: skip


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions close after saving, kept open to be inspected."""
    kept = []
    monkeypatch.setattr(plt, "close", lambda figure=None: kept.append(figure))
    yield kept
    monkeypatch.undo()
    for figure in kept:
        plt.close(figure)


def legend_of(figure):
    legends = list(figure.legends) + [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert len(legends) == 1, legends
    return legends[0]


def data_boxes(figure, renderer) -> list:
    """Display-space boxes of every data mark: each point of each line with markers (a box of its marker size) and
    each bar."""
    boxes = []
    for axis in figure.axes:
        for line in axis.lines:
            if line.get_marker() in (None, "None", "", " "):
                continue
            half = line.get_markersize() * figure.dpi / 72 / 2
            for x, y in axis.transData.transform(np.asarray(line.get_xydata(), dtype=float)):
                boxes.append(matplotlib.transforms.Bbox([[x - half, y - half], [x + half, y + half]]))
        boxes += [patch.get_window_extent(renderer) for container in axis.containers for patch in container]
    assert boxes
    return boxes


def assert_legend_covers_no_data(figure) -> None:
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    legend = legend_of(figure).get_window_extent(renderer)
    covered = [box for box in data_boxes(figure, renderer) if box.overlaps(legend)]
    assert not covered, f"the legend {legend} covers {covered}"


@pytest.mark.parametrize(
    "verdicts",
    [("gone", "reduced", "leaks", "gone", "leaks", "unchanged (expected)"), ("gone",) * 6, ("leaks", "gone") * 3],
)
def test_the_audit_legend_has_an_entry_per_verdict_colour_present(verdicts, figures, tmp_path):
    report = audit_report(verdicts)
    report.plot(tmp_path / "audit.png")
    (figure,) = figures
    legend = legend_of(figure)
    present = [v for v in ("gone", "reduced", "leaks", "unchanged (expected)") if v in verdicts]
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["before the edit", *[f"after: {v}" for v in present], "chance"]
    for verdict in present:
        handle = legend.legend_handles[labels.index(f"after: {verdict}")]
        assert to_rgba(handle.get_facecolor()) == to_rgba(verdict_colour(verdict))
    # and the bars carry those colours: each row's "after" bar in its verdict's colour
    after_bars = [bar for axis in figure.axes for bar in axis.containers[1]]
    rows = [row for probe in report.probes_run for row in report.rows if row.probe == probe]
    assert [to_rgba(bar.get_facecolor()) for bar in after_bars] == [to_rgba(verdict_colour(r.verdict)) for r in rows]
    assert_legend_covers_no_data(figure)


@pytest.mark.parametrize("method", ["nullspace", "ccup"])
def test_each_calibration_point_is_labelled_with_its_strength_on_an_axis_of_accuracy_change(method, figures, tmp_path):
    report = calibration_report(method)
    report.plot(tmp_path / "calibration.png")
    (figure,) = figures
    (axis,) = figure.axes
    labels = [text for text in axis.texts if text.get_gid() == STRENGTH_LABEL]
    assert len(labels) == len(report.candidates)
    for label, candidate in zip(labels, report.candidates, strict=True):
        assert label.xy == pytest.approx((-100 * candidate.retain_drop, 100 * candidate.forget_accuracy))
        shown = candidate.strength if method == "nullspace" else {"ccup_mu": candidate.strength["ccup_mu"]}
        assert label.get_text() == format_strength(shown).replace(" = ", "=")
    # labels that would overlap are hidden, never the chosen strength's; most are shown
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    visible = [label for label in labels if label.get_visible()]
    assert any(
        label.xy == (-100 * report.chosen.retain_drop, 100 * report.chosen.forget_accuracy) for label in visible
    )
    assert len(visible) >= len(labels) // 2
    boxes = [label.get_window_extent(renderer) for label in visible]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    # the axis reads as accuracy does: the change of retain accuracy, 0 (the unedited model) drawn as a line, and a
    # point that improved retain accuracy (a negative drop) to the right of it
    assert "retain accuracy change" in axis.get_xlabel()
    assert any(
        line.get_xdata()[0] == 0 == line.get_xdata()[-1] and line.get_linestyle() == "-"
        for line in axis.lines
        if len(line.get_xdata()) == 2
    )
    improved = min(report.candidates, key=lambda c: c.retain_drop)
    assert improved.retain_drop < 0 and axis.get_xlim()[1] > -100 * improved.retain_drop > 0
    assert_legend_covers_no_data(figure)


@pytest.mark.parametrize("before_forget", [0.98, 0.6, 0.3, 0.05])
def test_the_sweep_legend_covers_no_point(before_forget, figures, tmp_path):
    from hf_clip_forget.cli.evaluate import plot_sweep

    class Before:
        forget_accuracy, retain_accuracy = before_forget, 0.55

    rows = [{"alpha": a, "forget_accuracy": before_forget * (1 - a), "retain_accuracy": 0.55 - 0.05 * a}
            for a in (0.0, 0.25, 0.5, 0.75, 1.0)]  # fmt: skip
    plot_sweep(rows, Before(), ["dog"], str(tmp_path / "sweep.png"))
    (figure,) = figures
    labels = [text.get_text() for text in legend_of(figure).get_texts()]
    assert labels == ["forget accuracy", "retain accuracy", "retain, before"]
    assert_legend_covers_no_data(figure)
