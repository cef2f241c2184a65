"""What ``edit-index`` says about forgetting in the index: the measured advice for the adapter's settings, and with
``--audit-labels`` the retrieval audit of a labelled sample of the index, printed and recorded in the provenance."""

from __future__ import annotations

from collections.abc import Callable

from .loading import CommandError, one_line


def add_index_audit_arguments(edit) -> None:
    edit.add_argument("--audit-labels", default=None, metavar="COLUMN",
                      help="audit the edited index: text→image R-precision of each forgotten class (its prompts, "
                      "held-out prompts, neighbour names) and image→image precision, before and after, on a sample "
                      "of the index labelled by COLUMN (clip-retrieval: a column of metadata/*.parquet; tables: a "
                      "column of the same table); printed and recorded in the provenance file")  # fmt: skip
    edit.add_argument("--audit-sample", type=int, default=20_000,
                      help="vectors audited with --audit-labels, evenly spaced over the index (default 20000)")  # fmt: skip


def print_index_advice(model) -> None:
    """One line per active adapter whose settings were measured not to make a stored index forget."""
    from ..index.retrieval import index_recommendation

    for name in model.active_adapters:
        advice = index_recommendation(model.peft_config[name])
        if advice:
            print(f"note ({name}): {advice}")


def index_audit(args, model, tokenizer, edit=None) -> dict | None:
    """Run the retrieval audit of ``edit`` (default: the model's) on a labelled sample of ``--input`` (before anything
    is written) and print it; the record for the provenance, or ``None`` without ``--audit-labels``."""
    if not args.audit_labels:
        return None
    from ..index.labels import labelled_sample
    from ..index.retrieval import audit_index
    from ..index.shards import discover_layout

    if args.audit_sample < 1:
        raise CommandError(f"--audit-sample must be at least 1, got {args.audit_sample}.")
    try:
        sample = labelled_sample(discover_layout(args.input, args.side, args.column), args.audit_labels,
                                 args.audit_sample)  # fmt: skip
        report = audit_index(model, tokenizer, sample.vectors, sample.labels, sample.class_names, side=args.side,
                             edit=edit)  # fmt: skip
    except ValueError as error:
        raise CommandError(one_line(error)) from error
    print(report)
    return {"audit": {**report.to_dict(), "sampled_from": sample.total, "label_column": args.audit_labels}}


def with_record(finish: Callable[[str], dict] | None, record: dict | None) -> Callable[[str], dict] | None:
    """``finish`` (the FAISS rebuild, or nothing) followed by adding ``record`` to the provenance."""
    if record is None:
        return finish
    if finish is None:
        return lambda staging: dict(record)
    return lambda staging: {**finish(staging), **record}
