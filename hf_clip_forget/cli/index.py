"""``hf-clip-forget edit-index``: apply a saved adapter's edit to a stored embedding index, exactly, streaming, into a
new index beside the untouched input."""

from __future__ import annotations

import warnings

from .loading import CommandError, load_adapter, load_dual_encoder, one_line


def add_index_parser(commands) -> None:
    """The ``edit-index`` subcommand's arguments."""
    edit = commands.add_parser(
        "edit-index",
        help="apply a forget adapter to stored embeddings (clip-retrieval, parquet/Arrow, .npy) without re-encoding",
        description="Write a copy of an embedding index with the adapter's edit applied to its vectors: exactly what "
        "re-encoding every input with the edited model would store, for the cost of reading the index once. The "
        "input is never modified; the output is published at once with a provenance file. An interrupted run "
        "resumes where it stopped when run again.",
    )
    edit.add_argument("model", help="the base model that made the index: Hub id, local path, or `demo`")
    edit.add_argument("--adapter", required=True, help="the saved forget adapter or stack (directory or Hub id)")
    edit.add_argument("--input", required=True, help="the index: clip-retrieval folder, .npy file/folder, parquet, "
                      "or a `datasets` dataset saved to disk")  # fmt: skip
    edit.add_argument("--output", required=True, help="where the edited index is written (a new path)")
    edit.add_argument("--side", choices=("image", "audio", "text"), default="image",
                      help="which embeddings the index holds (default: image; clip-retrieval: img_emb or text_emb)")  # fmt: skip
    edit.add_argument("--column", default=None, help="the column holding the vectors (parquet / Arrow / datasets)")
    unit = edit.add_mutually_exclusive_group()
    unit.add_argument("--normalized", dest="normalized", action="store_true", default=None,
                      help="the vectors are L2-normalised (default: decided from them)")  # fmt: skip
    unit.add_argument("--raw", dest="normalized", action="store_false", help="the vectors are not normalised")
    edit.add_argument("--workers", type=int, default=2, help="shards in flight at once (default 2)")
    edit.set_defaults(handler=command_edit_index)


def command_edit_index(args) -> int:
    from ..index import UneditedSideWarning, edit_index, embedding_edit

    if args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}.")
    model, _, _ = load_dual_encoder(args.model, image_processor=False)
    edited = load_adapter(model, args.adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UneditedSideWarning)
        try:
            edit = embedding_edit(edited, args.side)
        except ValueError as error:
            raise CommandError(one_line(error)) from error
    for warning in caught:
        print(f"warning: {warning.message}")
    try:
        result = edit_index(edit, args.input, args.output, column=args.column, normalized=args.normalized,
                            workers=args.workers)  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        raise CommandError(one_line(error)) from error
    record = result.provenance
    print(
        f"edited {record['vectors']} {args.side} vectors ({len(record['output']['sha256'])} shards, "
        f"{'normalised' if record['normalized'] else 'raw'}, forgetting {edit.to_dict()['forgotten']}) in "
        f"{result.seconds:.1f} s → {result.output}; the input is untouched (revert: use it again)."
    )
    return 0
