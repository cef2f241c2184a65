"""``hf-clip-forget audit``: try to get the forgotten classes of a saved adapter back, and say how far each probe got."""

from __future__ import annotations

from .arguments import names_option, templates_option, write_json
from .loading import (
    CommandError,
    cached_image_features,
    check_output_path,
    command_processes,
    load_adapter,
    load_dual_encoder,
    require_image_classifier,
)


def add_audit_parser(commands) -> None:
    """The ``audit`` subcommand's arguments."""
    audit = commands.add_parser(
        "audit", help="probes that try to get the forgotten classes back (held-out prompts, other names, retrieval)"
    )
    audit.add_argument("model", help="the base model: Hub id, local path, or `demo`")
    audit.add_argument("--adapter", required=True, help="the saved forget adapter (directory or Hub id)")
    audit.add_argument("--data", default=None, help="labelled images for the image probes (parquet, image folder…)")
    audit.add_argument("--split", default="test", help="split of --data (a file or unsplit folder is its only one)")
    audit.add_argument("--neighbours", default=None, help="other names of the forgotten classes, comma-separated")
    audit.add_argument(
        "--vocabulary-neighbours", type=int, default=5, help="nearest vocabulary words to try per class (0: none)"
    )
    audit.add_argument("--candidates", default=None, help="more class names to compete with, comma-separated")
    audit.add_argument("--held-out-templates", nargs="+", default=None, help="templates not used by the edit")
    audit.add_argument("--no-cache", action="store_true", help="do not reuse cached image features")
    audit.add_argument("--json", default=None, help="write the report here")
    audit.add_argument("--plot", default=None, help="write a before/after plot (PNG) here")
    audit.set_defaults(handler=command_audit)


def command_audit(args) -> int:
    """Audit ``--adapter`` on MODEL; exit 0 (a report of what the probes found, leaks included)."""
    from ..audit import audit_forgetting

    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_output_path(path, flag)
    if args.vocabulary_neighbours < 0:
        raise CommandError(f"--vocabulary-neighbours must be >= 0, got {args.vocabulary_neighbours}.")
    command_processes("audit")
    model, tokenizer, image_processor = load_dual_encoder(args.model, image_processor=bool(args.data))
    features = None
    if args.data:
        require_image_classifier(model, "audit --data")
        features = cached_image_features(model, image_processor, args.data, args.split, use_cache=not args.no_cache)
    edited = load_adapter(model, args.adapter)
    report = audit_forgetting(
        edited,
        tokenizer,
        neighbours=names_option(args, "neighbours", "--neighbours"),
        vocabulary_neighbours=args.vocabulary_neighbours,
        candidate_classes=names_option(args, "candidates", "--candidates"),
        held_out_templates=templates_option(args.held_out_templates),
        data=features,
    )
    print(report)
    write_json(args.json, report.to_dict())
    if args.plot:
        report.plot(args.plot)
    leaks = len(report.leaks)
    print(f"\n{leaks} probe(s) leak" if leaks else "\nno probe leaks")
    return 0
