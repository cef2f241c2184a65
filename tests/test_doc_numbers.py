"""The numbers the docs' tables quote come from the JSON committed beside them.

For every ``docs/X.md`` with a committed ``docs/X.json`` (and ``docs/X_*.json`` that no ``docs/X_*.md`` claims, as
``audit_caltech101.json``), and for the README's tables, each table body cell number written in one of these forms
is checked:

- a percentage, ``12.3 %``;
- a before → after pair, ``45.4 → 13.8 %`` or ``0.19 → 0.13`` (both numbers);
- a pair ``0.2 / 90.0`` filling the whole cell (both numbers);
- a cell that is one decimal number, bare or followed by a lower-case word or unit (``2.633``, ``0.35 reduced``,
  ``0.34 s``).

Such a number must be a value of the doc's JSON files as shown: equal after rounding to the digits shown (either
direction of a half), as stored, as a fraction shown in per cent (×100) or as a count shown in millions. Prose,
headers, signed deltas (``+0.8``), ranges (``0.00–0.91``) and bare integers are not checked: the test is cheap and
does not fail on what it cannot read. It checks that a number exists in the JSON, not that it is the right one of
the JSON's numbers: a stale number that happens to equal another value still passes.

A table that legitimately quotes another run goes into :data:`ALLOWED_TABLES` (keyed by words of the paragraph just
above it), a single number into :data:`ALLOWED`, each with the reason.
"""

from __future__ import annotations

import bisect
import json
import re
from functools import cache
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Documents whose tables quote JSON files other than their own name's (doc → the JSON files, why).
SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "README.md": (
        (
            "domains.json",
            "domains_variants.json",
            "audit.json",
            "audit_caltech101.json",
            "calibration.json",
            "forgetting.json",
        ),
        "the README's tables summarise docs/domains.md and docs/audit.md",
    ),
    "domains.md": (
        ("domains.json", "domains_variants.json", "audit.json", "audit_caltech101.json"),
        "the global-estimate table's 'real' column quotes docs/audit.md's measured forget accuracies",
    ),
}

#: doc → {words of the paragraph just above a table: why that table's numbers are not in the doc's JSON}.
ALLOWED_TABLES: dict[str, dict[str, str]] = {
    "audit.md": {
        "--time-data-free": "timings printed by `scripts/audit_methods.py --time-data-free` (the command is above "
        "the table); that mode writes no JSON",
    },
    "baselines.md": {
        'images per class (100 of "person")': "the `--quick` run, printed by `scripts/compare_baselines.py --quick` "
        "(the command is above the table); docs/baselines.json holds the full run",
    },
    "families_benchmark.md": {
        "--families CLIPModel,MetaClip2Model --repeats 2 --rounds 5": "the idle-core rerun of two rows, printed by "
        "the command above the table and not written to docs/families_benchmark.json",
    },
    "prompt_cache.md": {
        "The previous run, before that change": "the superseded run of the same command, kept as history; "
        "docs/prompt_cache.json holds the current run",
    },
}

#: doc → {number as shown: why it is not in the doc's JSON}.
ALLOWED: dict[str, dict[str, str]] = {}

_NUMBER = r"(\d+(?:,\d{3})*(?:\.\d+)?)"
# "a → b" (each optionally followed by %): not part of a range ("0.00–0.91 → 0.20–0.96")
_PAIR = re.compile(rf"(?<![\d.,–-]){_NUMBER}\s*%?\s*→\s*{_NUMBER}(?![\d.]*\s*[–-]\s*\d)")
# "12.3 %" (not a signed delta, not the end of a range)
_PERCENT = re.compile(rf"(?<![\d.,+−–-]){_NUMBER}\s*%")
_SLASH = re.compile(rf"{_NUMBER}\s*%?\s*/\s*{_NUMBER}\s*%?")
_DECIMAL_CELL = re.compile(r"(\d+\.\d+)(?:\s*(?:×|[a-z(][^A-Z]*))?")
#: How a JSON value may be shown: as stored, a fraction in per cent, a count in millions, seconds in milliseconds.
SCALES = (1.0, 100.0, 1e-6, 1e3)


def doc_sources() -> list[tuple[Path, list[Path]]]:
    """Every checked document with the JSON files its tables quote."""
    found = []
    for doc in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        if doc.name in SOURCES:
            sources = [DOCS / name for name in SOURCES[doc.name][0]]
        else:
            sources = sorted(
                path
                for path in DOCS.glob("*.json")
                if path.stem == doc.stem
                or (path.stem.startswith(doc.stem + "_") and not path.with_suffix(".md").exists())
            )
        if sources:
            found.append((doc, sources))
    return found


def table_cells(text: str) -> list[tuple[int, str, str]]:
    """``(line number, cell, caption)`` of every body cell of every Markdown table (header rows and separators
    skipped); the caption is the paragraph just above the table."""
    lines = text.splitlines()
    cells, caption, in_table = [], "", False
    for index, line in enumerate(lines):
        is_table = line.lstrip().startswith("|")
        if not is_table:
            in_table = False
            continue
        if not in_table:  # a table starts: its header row
            in_table = True
            above = index - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            start = above
            while start > 0 and lines[start - 1].strip() and not lines[start - 1].lstrip().startswith("|"):
                start -= 1
            caption = " ".join(lines[start : above + 1])
            continue
        if set(line.replace("|", "").strip()) <= set("-: "):
            continue
        for cell in re.split(r"(?<!\\)\|", line.strip().strip("|")):
            cells.append((index + 1, cell.replace("**", "").replace("`", "").strip(), caption))
    return cells


def quoted_numbers(cell: str) -> list[str]:
    """The numbers of ``cell`` that the test checks, as written."""
    pairs = list(_PAIR.finditer(cell))
    numbers = [number for match in pairs for number in match.groups()]
    numbers += [
        match.group(1)
        for match in _PERCENT.finditer(cell)
        if not any(start <= match.start() < end for start, end in (m.span() for m in pairs))
    ]
    if not numbers and (slash := _SLASH.fullmatch(cell)):
        numbers = list(slash.groups())
    if not numbers and (decimal := _DECIMAL_CELL.fullmatch(cell)):
        numbers = [decimal.group(1)]
    return numbers


@cache
def json_values(paths: tuple[Path, ...]) -> list[float]:
    """Every number in the JSON files, sorted."""
    values: list[float] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            values.append(float(node))

    for path in paths:
        walk(json.loads(path.read_text(encoding="utf-8")))
    return sorted(values)


def shown_as(number: str, values: list[float]) -> bool:
    """Whether some value rounds to ``number`` at the precision shown, at one of the :data:`SCALES`."""
    shown = float(number.replace(",", ""))
    half = 0.5 * 10 ** -len(number.partition(".")[2]) + 1e-9
    for scale in SCALES:
        low = bisect.bisect_left(values, (shown - half) / scale)
        if low < len(values) and values[low] * scale <= shown + half:
            return True
    return False


def unmatched(doc: Path, sources: list[Path]) -> list[str]:
    values = json_values(tuple(sources))
    allowed, tables = ALLOWED.get(doc.name, {}), ALLOWED_TABLES.get(doc.name, {})
    return [
        f"{doc.name}:{line}: {number} (cell: {cell!r})"
        for line, cell, caption in table_cells(doc.read_text(encoding="utf-8"))
        if not any(words in caption for words in tables)
        for number in quoted_numbers(cell)
        if number not in allowed and not shown_as(number, values)
    ]


CHECKED = doc_sources()


@pytest.mark.parametrize(("doc", "sources"), CHECKED, ids=[doc.name for doc, _ in CHECKED])
def test_table_numbers_come_from_the_committed_json(doc, sources):
    missing = unmatched(doc, sources)
    assert not missing, (
        f"numbers in {doc.name}'s tables that {[p.name for p in sources]} do not hold (fix the doc from the JSON, "
        "or allow the number or its table, with the reason):\n" + "\n".join(missing)
    )


def test_the_check_reads_the_docs_tables():
    """Guards against a check that passes because it reads nothing: the main measured docs are checked and have
    many table numbers each; every allowance still names a table or number of its doc."""
    counts = {doc.name: sum(len(quoted_numbers(c)) for _, c, _ in table_cells(doc.read_text())) for doc, _ in CHECKED}
    for name in ("audit.md", "domains.md", "forgetting.md", "calibration.md", "templates.md", "baselines.md"):
        assert counts.get(name, 0) >= 40, counts
    for name, tables in ALLOWED_TABLES.items():
        captions = {caption for _, _, caption in table_cells((DOCS / name).read_text())}
        assert all(any(words in caption for caption in captions) for words in tables), name
    for name, numbers in ALLOWED.items():
        text = (ROOT / name if name == "README.md" else DOCS / name).read_text()
        assert all(number in text for number in numbers), name


@pytest.mark.parametrize(
    ("cell", "numbers"),
    [
        ("45.4 → 13.8 %", ["45.4", "13.8"]),
        ("45 → 35 % · 74 → 70 %", ["45", "35", "74", "70"]),
        ("95.9 % → 95.3 %", ["95.9", "95.3"]),
        ("2.7 %", ["2.7"]),
        ("+0.8", []),
        ("−1.4", []),
        ("worse: 0.00–0.91 → 0.20–0.96", []),
        ("0.2 / 90.0", ["0.2", "90.0"]),
        ("0.35 reduced", ["0.35"]),
        ("0.19 (2 of 5 leak)", ["0.19"]),
        ("9.7 KiB", []),
        ("n/a (refused)", []),
        ("800", []),
    ],
)
def test_which_cell_numbers_are_checked(cell, numbers):
    assert quoted_numbers(cell) == numbers


def test_a_number_matches_its_json_value_as_rounded():
    values = sorted([0.4539, 45.45, 26362369.0])
    assert shown_as("45.4", values) and shown_as("45.5", values) and shown_as("45", values)
    assert shown_as("26.4", values)  # a count in millions
    assert not shown_as("24", values) and not shown_as("45.40", values)
