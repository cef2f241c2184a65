"""What the command line says in the user's terms: every option has help and shows its default; `forget --help` states
the template default's rule; `calibrate` reports a gain as a gain and says how it chose."""

import argparse
import re

import pytest

from hf_clip_forget.calibration.report import BeforeAfter, CalibrationReport, ValidationSet
from hf_clip_forget.cli import build_parser
from hf_clip_forget.core.calibration import CalibrationBudget, Candidate
from hf_clip_forget.families import family_of_class


def subparsers(parser, path=()):
    """``(command path, parser)`` for the parser and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def options():
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                yield " ".join(path) or "hf-clip-forget", parser, action


def shown_default(default) -> str:
    return re.escape(str(default))


@pytest.mark.parametrize(
    ("command", "parser", "action"), list(options()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_option_has_help_and_shows_a_default_it_has(command, parser, action):
    name = "/".join(action.option_strings) or action.dest
    assert (action.help or "").strip(), f"`{command} {name}` has no help text"
    if action.default is None or action.default is False:
        return
    text = parser._get_formatter()._expand_help(action)
    assert re.search(rf"default[:\s]+{shown_default(action.default)}", text), (
        f"`{command} {name}` does not show its default {action.default!r}: {text!r}"
    )


def test_the_options_the_issue_named_now_have_help_and_defaults():
    helps = {path: parser.format_help() for path, parser in subparsers(build_parser())}
    assert "split of --data" in helps[("eval",)] and "templates of the zero-shot classifier" in helps[("eval",)]
    assert "nullspace strengths α to try" in helps[("sweep",)] and "(default: 0,0.25,0.5,0.75,1)" in helps[("sweep",)]
    assert "the projection to edit" in helps[("forget",)] and "split of --data" in helps[("audit",)]
    assert "(default: 0.0001)" in helps[("verify",)]


def test_forget_help_states_the_template_default_rule():
    (forget,) = [p for path, p in subparsers(build_parser()) if path == ("forget",)]
    (templates,) = [a for a in forget._actions if "--templates" in a.option_strings]
    text = " ".join(templates.help.split())
    default = family_of_class("CLIPModel").image_side_templates
    assert f"'{default}' (CLIP's 7 templates) for a global image-side edit that names --retain-classes" in text
    assert "otherwise" in text and "'imagenet' (80 templates)" in text
    assert "default: 'single' for an image-side edit" not in text


def report(retain_drop: float, choice: str = "met") -> CalibrationReport:
    chosen = Candidate({"alpha": 1.0}, 0.0, 0.91, retain_drop)
    return CalibrationReport(
        adapter="default", classes=("dog",), retain_classes=("cat",), domains=(), retain_domains=(), paradigm="global",
        method="nullspace", budget=CalibrationBudget(0.01, 0.01), budget_met=True, choice=choice, searched=("alpha",),
        chosen=chosen, candidates=(chosen,), forget_accuracy=BeforeAfter(0.7, 0.0),
        kept_accuracy=BeforeAfter(0.9, 0.9 - retain_drop), per_class=(), per_cell=(),
        validation=ValidationSet(100, 10, 90, "0" * 64, "image bytes"), seconds=1.0,
    )  # fmt: skip


def test_calibration_calls_a_gain_a_gain_and_says_how_it_chose():
    gained = str(report(-0.01))
    assert "gain +1.0 points" in gained and "drop -" not in gained
    assert "drop 2.0 points" in str(report(0.02))
    assert "drop 0.0 points" in str(report(-0.0001))  # rounds to no change: not a "gain +0.0"
    for choice in ("met", "retain_only", "nearest"):
        text = str(report(0.0, choice))
        assert "Chosen by among" not in text and "How the strength was chosen: " in text


def test_the_readme_states_the_template_default_rule_where_the_option_is_described():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `templates` |")]
    default = family_of_class("CLIPModel").image_side_templates
    assert f'Default: `"{default}"` for a global image-side edit that names `retain_classes`' in row
    assert "pending" not in row and '`"single"` for image-side edits' not in row
