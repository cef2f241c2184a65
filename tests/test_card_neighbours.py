"""A card does not claim what its own audit refutes: neighbour words (``expand_neighbours``) that the audit found
still recognised are listed as targeted, with the audit's finding, not as forgotten."""

import dataclasses

import pytest
from huggingface_hub import ModelCard

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.audit import AuditRow
from hf_clip_forget.hub.card import build_model_card
from hf_clip_forget.testing_utils import tiny_clip


@pytest.fixture(scope="module")
def expanded(tokenizer):
    """A tiny CLIP forgetting "cat" and its nearest vocabulary words, with a real data-free audit that tries them."""
    model = add_forget_adapter(tiny_clip(seed=0), ["cat"], tokenizer, retain_classes=["dog", "bird", "ship"],
                               expand_neighbours=3, show_progress=False)  # fmt: skip
    words = model.peft_config["default"].neighbour_names["cat"]
    assert len(words) >= 2, f"the tests need two neighbour words, the tiny vocabulary gave {words}"
    report = model.audit_forgetting(tokenizer, neighbours=words, vocabulary_neighbours=0, show_progress=False)
    return model, words, report


def with_verdicts(report, verdicts: dict):
    """``report`` with the neighbour-name rows of the words in ``verdicts`` set to that verdict's numbers (a leak:
    1.00 after the edit as before; gone: chance), and the rows of words mapped to ``None`` removed."""
    numbers = {"leaks": (1.0, 1.0), "reduced": (1.0, 0.4), "gone": (1.0, 0.25)}
    rows = []
    for row in report.rows:
        if row.probe == "neighbour name" and row.subject in verdicts:
            if verdicts[row.subject] is None:
                continue
            before, after = numbers[verdicts[row.subject]]
            row = AuditRow.judged(row.probe, row.forgotten_class, row.subject, row.metric, before, after, 0.25)
            assert row.verdict == verdicts[row.subject]
        rows.append(row)
    return dataclasses.replace(report, rows=tuple(rows))


def forgotten_cell(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("| `default` |"))


@pytest.mark.parametrize(("verdict", "after"), [("leaks", "1.00"), ("reduced", "0.40")])
def test_a_word_the_audit_found_recognised_is_listed_as_targeted_with_the_finding_not_as_forgotten(
    expanded, verdict, after
):
    model, (found, *gone), report = expanded
    audit = with_verdicts(report, {found: verdict, **dict.fromkeys(gone, "gone")})
    card = build_model_card(model, audit=audit).text
    cell = forgotten_cell(card)
    forgotten_part, _, targeted_part = cell.partition("not forgotten")
    assert f"and its neighbours {', '.join(gone)}, gone in the audit" in forgotten_part
    assert found not in forgotten_part
    # what the audit found, with its numbers
    assert f"{found} ({verdict}: {after} of the class's held-out prompts recognised as this word" in targeted_part
    assert "1.00 before, chance 0.25" in targeted_part
    assert "A word is listed as forgotten only where the audit below found it gone" in " ".join(card.split())
    # the audit section shows the same row
    assert f"| neighbour name | cat | {found} |" in card and f"| {verdict} |" in card


def test_a_word_the_audit_did_not_try_is_not_claimed_either(expanded):
    model, (untried, *gone), report = expanded
    audit = with_verdicts(report, {untried: None, **dict.fromkeys(gone, "gone")})
    cell = forgotten_cell(build_model_card(model, audit=audit).text)
    assert f"and its neighbours {', '.join(gone)}, gone in the audit" in cell
    assert f"targeted, not tried by the audit: {untried}" in cell and "not forgotten" not in cell


def test_without_an_audit_the_card_lists_the_neighbours_and_says_nothing_checked_them(expanded, tmp_path):
    model, words, _ = expanded
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md").text
    assert f"cat (and its neighbours {', '.join(words)})" in forgotten_cell(card)
    assert "No audit has checked them" in " ".join(card.split())


def test_a_card_without_neighbour_words_has_no_neighbour_note(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, retain_classes=["dog"], show_progress=False)
    report = model.audit_forgetting(tokenizer, vocabulary_neighbours=0, show_progress=False)
    card = build_model_card(model, audit=report).text
    assert "Neighbour words." not in card and "| `default` | cat |" in card
