"""`eval` on data with domains (PACS) prints the forgotten classes per domain — the forgotten cells, then the class
in the kept domains — before → after, which the pooled per-class number hides."""

import json
import re

import pytest

from hf_clip_forget.cli import main
from hf_clip_forget.evaluation.reports import forgotten_class_cells

from .real_data import needs_pacs, stratified_pacs


PER_CELL = 3  # images per (domain, class) of the PACS test split: 84 images
OTHERS = "elephant,giraffe,guitar,horse,house,person"
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pacs") / "test.parquet"
    stratified_pacs(PER_CELL).to_parquet(str(path))
    return str(path)


def domain_rows(out: str) -> dict[str, tuple[float, float]]:
    """``{"sketch/dog (forgotten cell)": (before, after), ...}`` of the printed per-domain table."""
    table = out.split("forgotten classes per domain", 1)[1]
    return {
        m[1].strip(): (float(m[2]), float(m[3]))
        for m in re.finditer(r"^  (.+?)\s+([\d.]+)%\s+([\d.]+)%$", table, re.M)
    }


@needs_pacs
def test_eval_of_a_domain_edit_prints_the_forgotten_cell_and_the_class_in_the_kept_domains(data, tmp_path, capsys):
    adapter, report = str(tmp_path / "no-sketch-dog"), tmp_path / "eval.json"
    assert main(["forget", "demo", "--classes", "dog", "--domains", "sketch", "--retain-domains",
                 "photo,art_painting,cartoon", "--retain-classes", OTHERS, "--output", adapter]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "demo", "--adapter", adapter, "--data", data, "--json", str(report)]) == 0
    rows = domain_rows(capsys.readouterr().out)
    kept = [d for d in DOMAINS if d != "sketch"]
    assert list(rows) == [
        "sketch/dog (forgotten cell)",
        *(f"{d}/dog (kept domain)" for d in kept),
        "dog in the kept domains (pooled)",
    ]
    cells = json.loads(report.read_text())
    for domain in DOMAINS:
        label = f"{domain}/dog ({'forgotten cell' if domain == 'sketch' else 'kept domain'})"
        expected = (100 * cells["before"]["per_domain_class"][f"{domain}/dog"],
                    100 * cells["after"]["per_domain_class"][f"{domain}/dog"])  # fmt: skip
        assert rows[label] == pytest.approx(expected, abs=0.051)
    pooled = rows["dog in the kept domains (pooled)"]
    assert pooled[0] == pytest.approx(sum(rows[f"{d}/dog (kept domain)"][0] for d in kept) / 3, abs=0.1)


@needs_pacs
def test_eval_of_a_global_edit_shows_every_domain_as_a_forgotten_cell(data, tmp_path, capsys):
    adapter = str(tmp_path / "no-dog")
    assert main(["forget", "demo", "--classes", "dog", "--retain-classes", OTHERS, "--output", adapter]) == 0
    capsys.readouterr()
    assert main(["eval", "demo", "--adapter", adapter, "--data", data]) == 0
    rows = domain_rows(capsys.readouterr().out)
    assert list(rows) == [f"{d}/dog (forgotten cell)" for d in DOMAINS]
    assert all(after < before for before, after in rows.values() if before > 0)


def test_forgotten_class_cells_orders_forgotten_then_kept_then_pooled_by_images():
    before = {"photo/dog": 0.8, "sketch/dog": 0.5, "cartoon/dog": 0.6, "photo/cat": 0.9}
    after = {"photo/dog": 0.7, "sketch/dog": 0.1, "cartoon/dog": 0.3, "photo/cat": 0.9}
    images = {"photo/dog": 30, "sketch/dog": 10, "cartoon/dog": 10, "photo/cat": 10}
    rows = forgotten_class_cells(before, after, ["dog"], ["sketch"], images)
    assert [(r.name, r.role) for r in rows] == [
        ("sketch/dog", "forgotten cell"),
        ("photo/dog", "kept domain"),
        ("cartoon/dog", "kept domain"),
        ("dog in the kept domains", "pooled"),
    ]
    assert (rows[-1].before, rows[-1].after) == pytest.approx(((30 * 0.8 + 10 * 0.6) / 40, (30 * 0.7 + 10 * 0.3) / 40))
    assert [r.role for r in forgotten_class_cells(before, after, ["dog"])] == ["forgotten cell"] * 3
    assert forgotten_class_cells(before, after, ["horse"]) == []
