"""The "Calibration" section of a forget adapter's card: how its strength was chosen on a labelled validation set."""

from __future__ import annotations

from ..core.calibration import CHOICES, STRENGTH_SYMBOLS, format_strength
from .card_rows import escape_markdown


def calibration_section(name: str, config) -> dict:
    """What the card shows of an adapter's calibration record (checked when its config was made): the budget, the
    strength chosen among those tried, the validation numbers and the validation set's size and hash."""
    record = config.calibration
    budget, candidates = record["budget"], record["candidates"]

    def percent(value: float) -> str:
        return f"{100 * value:.1f} %"

    def rows(entries: list[dict]) -> list[dict]:
        return [
            {
                "name": escape_markdown(row["name"]),
                "group": escape_markdown(row["group"]),
                "images": int(row["images"]),
                "before": percent(row["before"]),
                "after": percent(row["after"]),
            }
            for row in entries
        ]

    tried = [candidate["strength"] for candidate in candidates]
    grid = ", ".join(
        f"{STRENGTH_SYMBOLS[field]} from {min(s[field] for s in tried):.4g} to {max(s[field] for s in tried):.4g}"
        for field in record["searched"]
    )
    forget, kept = record["forget_accuracy"], record["kept_accuracy"]
    validation = record["validation"]
    return {
        "name": escape_markdown(name),
        "budget_met": bool(record["budget_met"]),
        "max_forget": percent(budget["max_forget"]),
        "max_retain_drop": f"{100 * budget['max_retain_drop']:.1f} points",
        "chosen": escape_markdown(format_strength(record["chosen"])),
        "choice": escape_markdown(CHOICES[record["choice"]]),
        "tried": len(candidates),
        "grid": escape_markdown(grid),
        "forget_before": percent(forget["before"]),
        "forget_after": percent(forget["after"]),
        "kept_before": percent(kept["before"]),
        "kept_after": percent(kept["after"]),
        "drop": _drop(record),
        "classifier": escape_markdown(record.get("classifier", "the adapter's own templates")),
        "num_images": int(validation["num_images"]),
        "forget_images": int(validation["forget_images"]),
        "kept_images": int(validation["kept_images"]),
        "sha256": escape_markdown(validation["sha256"]),
        "hashed": escape_markdown(validation["hashed"]),
        "per_class": rows(record["per_class"]),
        "per_cell": rows(record["per_cell"]),
    }


def _drop(record: dict) -> str:
    """The drop the budget bounded: the chosen candidate's (for a domain edit, that of its worst kept group)."""
    chosen = next(c for c in record["candidates"] if c["strength"] == record["chosen"])
    group = chosen.get("drop_group", "kept")
    where = "" if group == "kept" else f" (largest: the {escape_markdown(group)})"
    return f"{100 * chosen['retain_drop']:.1f} points{where}"
