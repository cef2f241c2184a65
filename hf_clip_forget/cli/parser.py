"""The ``hf-clip-forget`` argument parser: every command and option, each with its help and its default.

``calibrate``, ``audit`` and ``cache`` add their own subcommands (``add_*_parser`` in their modules); every parser made
here or there is a :class:`CommandParser`, whose help shows each option's default unless the help text says it.
"""

from __future__ import annotations

import argparse
import re

from ..api.verify import VERIFY_TOLERANCE
from .audit import add_audit_parser
from .cache import add_cache_parser
from .calibrate import add_calibrate_parser
from .commands import command_demo, command_forget, command_verify
from .detect import command_detect
from .evaluate import command_eval, command_sweep
from .index import add_index_parser


#: What ``forget --templates`` uses when not given (``families.py``: ``templates_for(target, retain_named)``).
TEMPLATES_DEFAULT = (
    "default: 'imagenet_selected' (CLIP's 7 templates) for a global image-side edit that names --retain-classes; "
    "otherwise (no --retain-classes, --domains with paradigm domain/complete, or --target text) 'imagenet' "
    "(80 templates); CLAP: its sound templates"
)


def mentions_default(text: str, default) -> bool:
    """Whether a help text states ``default`` ("default: test", "default 0.1", or argparse's ``%(default)s``)."""
    return "%(default)" in text or re.search(rf"default[:\s]+{re.escape(str(default))}", text) is not None


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: …)" to an option's help unless it is None or False (nothing to show) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or mentions_default(text, default):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows the defaults (:class:`DefaultsHelpFormatter`); its subcommands'
    parsers are made of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="hf-clip-forget",
        description="Forget classes from CLIP-style dual encoders by name: no data, no training.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also: HF_CLIP_FORGET_DEBUG=1)"
    )
    parser.add_argument(
        "--no-prompt-cache",
        action="store_true",
        help="encode every prompt anew instead of reusing cached prompt embeddings (also: HF_CLIP_FORGET_PROMPT_CACHE=0)",
    )
    parser.add_argument(
        "--trust-unverified",
        action="store_true",
        help="load adapters whose config lacks factor checksums or base fingerprints (not saved by hf_clip_forget, or "
        "stripped); everything else is still checked, and reports say 'unverified' (default: refuse them)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="offline demo on the embedded default model")
    demo.add_argument("--classes", default="dog", help="classes to forget (comma-separated; default: dog)")
    demo.add_argument("--data", default=None, help="also report accuracy on this labelled image set")
    demo.set_defaults(handler=command_demo)

    _add_forget_parser(commands)
    add_calibrate_parser(commands)

    verify = commands.add_parser(
        "verify",
        help="recompute a saved adapter from its recorded classes and check its stored factors (exit 1 if not)",
    )
    verify.add_argument("model", help="the base model: Hub id, local path, or `demo`")
    verify.add_argument("adapter", help="the saved forget adapter (directory or Hub id)")
    verify.add_argument("--tolerance", type=float, default=VERIFY_TOLERANCE, help="largest accepted |ΔM| entry")
    verify.add_argument("--json", default=None, help="write the report here")
    verify.set_defaults(handler=command_verify)

    add_audit_parser(commands)
    _add_detect_parser(commands)
    _add_eval_and_sweep_parsers(commands)
    add_cache_parser(commands)
    add_index_parser(commands)
    return parser


def _add_forget_parser(commands) -> None:
    forget = commands.add_parser("forget", help="build a forget adapter (or a merged model) and save it")
    forget.add_argument("model", help="Hub id, local path, or `demo`")
    forget.add_argument("--classes", required=True, help="classes to forget, comma-separated")
    forget.add_argument(
        "--retain-classes",
        default=None,
        help="the other classes to keep recognising, comma-separated: the edit keeps the direction all classes share "
        "(CCUP also keeps each of them)",
    )
    forget.add_argument(
        "--allow-unknown-names",
        action="store_true",
        help="use class and domain names as written even when they look like typos (a word the tokenizer does not "
        "know whole with a known word one edit away, mostly unknown tokens, a domain without built-in templates); "
        "by default such a name is an error that names the closest known words",
    )
    forget.add_argument("--alpha", type=float, default=None, help="nullspace strength in [0, 1] (default 1)")
    forget.add_argument(
        "--method",
        choices=["nullspace", "ccup", "logit"],
        default=None,
        help="default: logit for --paradigm domain with --retain-classes (image side: lowers only the forgotten "
        "classes' scores; the best measured on PACS domains, docs/domains.md), ccup for other --domains edits, "
        "nullspace otherwise",
    )
    forget.add_argument(
        "--ccup-mu",
        type=float,
        default=None,
        help="CCUP retain weight μ >= 0 (lower forgets more and keeps less elsewhere; default: 100 for global edits, "
        "30 for --paradigm domain, measured in docs/domains.md)",
    )
    forget.add_argument(
        "--logit-mu", type=float, default=None, help="--method logit: weight μ >= 0 of the kept cells (default 10)"
    )
    forget.add_argument(
        "--logit-margin",
        type=float,
        default=None,
        help="--method logit: how far below the best other class the forgotten class must fall on its own prompts "
        "(cosine units >= 0; default 0.2; higher forgets more)",
    )
    forget.add_argument("--ccup-lambda", type=float, default=None, help="CCUP forget weight λ >= 0 (default 1000)")
    forget.add_argument(
        "--target",
        choices=["visual", "text", "both"],
        default="visual",
        help="the projection to edit: visual (image side: every image loses the classes' directions), text (text "
        "side: forgotten prompts become generic ones) or both",
    )
    forget.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="prompt templates the class names are embedded with: a built-in set ('single', 'imagenet_selected', "
        f"'cifar', 'imagenet') or format strings with {{}}; {TEMPLATES_DEFAULT}",
    )
    forget.add_argument(
        "--no-keep-shared-direction",
        action="store_true",
        help="remove the forget classes' full embeddings, shared direction included (the default with no retain classes)",
    )
    forget.add_argument(
        "--domains", default=None, help="forget only in these domains, e.g. 'sketch' (comma-separated)"
    )
    forget.add_argument(
        "--retain-domains", default=None, help="domains where the classes stay recognisable (paradigm 'domain')"
    )
    forget.add_argument(
        "--paradigm",
        choices=["global", "domain", "complete"],
        default=None,
        help="global: everywhere; domain: only in --domains, kept in --retain-domains; complete: only in --domains, "
        "without protecting the classes elsewhere (default: domain with --domains, else global)",
    )
    forget.add_argument(
        "--prototypes", type=int, default=0, help="synthesised visual prototypes per forget cell (0: text only)"
    )
    forget.add_argument("--prototype-steps", type=int, default=60, help="optimisation steps per prototype")
    forget.add_argument("--seed", type=int, default=0, help="seed of the prototypes")
    forget.add_argument("--output", required=True, help="directory to save to")
    forget.add_argument("--merge", action="store_true", help="save the full model with the edit merged")
    forget.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this Hub repo")
    forget.add_argument(
        "--expand-neighbours",
        type=int,
        default=0,
        metavar="K",
        help="also forget the K vocabulary words nearest to each class (its other names; see `audit`)",
    )
    forget.add_argument(
        "--audit",
        action="store_true",
        help="also run the data-free audit (held-out prompts, vocabulary neighbours) and put it in the card and "
        "audit.json",
    )
    forget.set_defaults(handler=command_forget)


def _add_detect_parser(commands) -> None:
    detect = commands.add_parser(
        "detect", help="open-vocabulary detectors (OWL-ViT, OWLv2): boxes per text query before/after an adapter"
    )
    detect.add_argument("model", help="the detector: Hub id or local path")
    detect.add_argument("--adapter", default=None, help="a saved forget adapter (directory or Hub id)")
    detect.add_argument(
        "--reference", default=None, metavar="MODEL", help="for a merged MODEL: the original detector ('before')"
    )
    detect.add_argument("--images", nargs="+", required=True, help="image files, or folders of images")
    detect.add_argument("--queries", required=True, help="text queries, comma-separated ('a photo of a cat,...')")
    detect.add_argument(
        "--threshold", type=float, default=0.1, help="score threshold of the post-processing (default 0.1)"
    )
    detect.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    detect.add_argument("--json", default=None, help="write the counts here")
    detect.set_defaults(handler=command_detect)


def _add_eval_and_sweep_parsers(commands) -> None:
    for name, help_text in (("eval", "zero-shot accuracy before/after an adapter"), ("sweep", "α trade-off curve")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", help="Hub id, local path, or `demo`")
        sub.add_argument("--data", required=True, help="parquet file/folder, image folder, or Hub dataset id")
        sub.add_argument("--split", default="test", help="split of --data (a file or unsplit folder is its only one)")
        sub.add_argument("--json", default=None, help="write the results here")
        sub.add_argument("--no-cache", action="store_true", help="do not reuse cached image features")
        sub.add_argument("--batch-size", type=int, default=64, help="images per forward pass of the vision tower")
        if name == "eval":
            sub.add_argument("--adapter", default=None, help="a saved forget adapter (directory or Hub id)")
            sub.add_argument(
                "--reference",
                default=None,
                metavar="MODEL",
                help="for a merged MODEL: the original model, which gives the 'before' column (needs --forget)",
            )
            sub.add_argument("--forget", default=None, help="forgotten classes (default: the adapter's)")
            sub.add_argument(
                "--templates",
                nargs="+",
                default=None,
                help="templates of the zero-shot classifier: a built-in set ('imagenet', 'single', ...) or format "
                "strings with {} (default: 'imagenet', the 80-template ensemble)",
            )
            sub.set_defaults(handler=command_eval)
        else:
            sub.add_argument("--classes", required=True, help="classes to forget, comma-separated")
            sub.add_argument(
                "--alphas", default="0,0.25,0.5,0.75,1", help="nullspace strengths α to try, comma-separated"
            )
            sub.add_argument("--plot", default=None, help="write the trade-off plot (PNG) here")
            sub.add_argument(
                "--no-keep-shared-direction",
                action="store_true",
                help="do not keep the direction shared with the data's other classes (see `forget --help`)",
            )
            sub.set_defaults(handler=command_sweep)
