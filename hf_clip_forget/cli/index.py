"""``hf-clip-forget edit-index``: apply a saved adapter's edit to a stored embedding index, exactly, streaming, into a
new index beside the untouched input."""

from __future__ import annotations

import warnings

from .index_audit import add_index_audit_arguments, index_audit, print_index_advice, with_record
from .index_visual import add_visual_arguments, with_visual
from .loading import CommandError, load_adapter, load_dual_encoder, one_line


ENGINES = ("local", "ray")


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
    edit.add_argument("--input", help="the index: clip-retrieval folder, .npy file/folder, parquet, a `datasets` "
                      "dataset saved to disk, or a FAISS index alone (.faiss / .index) that stores its vectors "
                      "(Flat, IVF…,Flat, HNSW); required unless --lancedb")  # fmt: skip
    edit.add_argument("--output", help="where the edited index is written (a new path); required unless --lancedb")
    edit.add_argument("--side", choices=("image", "audio", "text"), default="image",
                      help="which embeddings the index holds (default: image; clip-retrieval: img_emb or text_emb)")  # fmt: skip
    edit.add_argument("--column", default=None, help="the column holding the vectors (parquet / Arrow / datasets; "
                      "with --lancedb the default is `vector`)")  # fmt: skip
    unit = edit.add_mutually_exclusive_group()
    unit.add_argument("--normalized", dest="normalized", action="store_true", default=None,
                      help="the vectors are L2-normalised (default: decided from them)")  # fmt: skip
    unit.add_argument("--raw", dest="normalized", action="store_false", help="the vectors are not normalised")
    edit.add_argument("--workers", type=int, default=None, help="shards edited at once (default: 2 with --engine "
                      "local; one per CPU of the cluster with --engine ray)")  # fmt: skip
    edit.add_argument("--engine", choices=ENGINES, default="local",
                      help="where the shards are edited: `local`, threads in this process, or `ray`, one Ray task per "
                      "shard (needs `pip install 'hf-clip-forget[ray]'` and, on a cluster, the input and output on a "
                      "filesystem every node sees at the same path; default: local)")  # fmt: skip
    edit.add_argument("--engine-address", default=None,
                      help="the Ray cluster to run on with --engine ray: `auto` on a cluster node, `<head-ip>:6379`, "
                      "or `ray://<head-ip>:10001` (default: start a local Ray instance on this machine)")  # fmt: skip
    _add_faiss_arguments(edit)
    _add_lancedb_arguments(edit)
    add_visual_arguments(edit)
    add_index_audit_arguments(edit)
    edit.set_defaults(handler=command_edit_index)


def _add_faiss_arguments(edit) -> None:
    from ..index.faiss_index import DEFAULT_TRAIN_ROWS

    edit.add_argument("--faiss-index", default=None,
                      help="a FAISS index built from --input's vectors: rebuilt from the edited vectors with its own "
                      "factory string, metric, ids and settings, in the same order, into the output and its "
                      "provenance (IVF / PQ: trained anew on the edited vectors); needs `pip install "
                      "'hf-clip-forget[faiss]'`")  # fmt: skip
    edit.add_argument("--faiss-output", default=None,
                      help="the rebuilt index's name (default: the --faiss-index's name inside the output folder, or "
                      "the output's name with its suffix beside a one-file output)")  # fmt: skip
    edit.add_argument("--faiss-train-rows", type=int, default=DEFAULT_TRAIN_ROWS,
                      help="rows an index that needs training is trained on, evenly spaced when it holds more "
                      f"(default: {DEFAULT_TRAIN_ROWS})")  # fmt: skip


def _add_lancedb_arguments(edit) -> None:
    edit.add_argument("--lancedb", default=None,
                      help="edit a LanceDB table in place instead (the database URI, with --table): one new table "
                      "version, written batch by batch, with the provenance in the vector column's metadata; "
                      "revert with table.restore(<version before>); needs `pip install 'hf-clip-forget[lancedb]'`")  # fmt: skip
    edit.add_argument("--table", default=None, help="the LanceDB table to edit (with --lancedb)")
    edit.add_argument("--batch-size", type=int, default=8192,
                      help="rows of the LanceDB table read, edited and written at a time (default: 8192)")  # fmt: skip


def command_edit_index(args) -> int:
    from ..index import UneditedSideWarning, edit_index, embedding_edit
    from ..index.distributed import ShardFailedError

    if args.workers is not None and args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}.")
    target = _target(args)  # before the model loads: a wrong combination is said at once
    mapper = _engine_mapper(args)  # before the model loads: a missing engine is said at once
    model, tokenizer, _ = load_dual_encoder(args.model, image_processor=False)
    edited = load_adapter(model, args.adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UneditedSideWarning)
        try:
            edit = embedding_edit(edited, args.side)
        except ValueError as error:
            raise CommandError(one_line(error)) from error
    for warning in caught:
        print(f"warning: {warning.message}")
    print_index_advice(edited)
    edit = with_visual(args, edit, edited, tokenizer, target)
    if target != "index":
        if args.audit_labels:
            raise CommandError("--audit-labels reads the labels of an index written anew (--input/--output).")
        return (_edit_table if target == "lancedb" else _edit_faiss_alone)(args, edit)
    audit = index_audit(args, edited, tokenizer, edit)  # on the input, before anything is written
    try:
        finish = with_record(_faiss_finish(args, edit), audit)
        result = edit_index(edit, args.input, args.output, column=args.column, normalized=args.normalized,
                            workers=args.workers or 2, mapper=mapper, finish=finish)  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError, ConnectionError, ShardFailedError, ImportError) as error:
        raise CommandError(one_line(error)) from error
    record = result.provenance
    print(
        f"edited {record['vectors']} {args.side} vectors ({len(record['output']['shards'])} shards, "
        f"{'normalised' if record['normalized'] else 'raw'}, forgetting {edit.to_dict()['forgotten']}) in "
        f"{result.seconds:.1f} s → {result.output}; the input is untouched (revert: use it again)."
    )
    if edit.visual_erasure is not None:
        print("with the visual erasure, the output is this index's own edit, not what re-encoding with the edited "
              "model gives (recorded in its provenance).")  # fmt: skip
    if "faiss" in record:
        _print_faiss(record["faiss"])
    return 0


def _engine_mapper(args):
    """``None`` (the local thread pool) or the mapper of the engine named by ``--engine``."""
    from ..index.distributed import ray_mapper

    if args.engine == "local":
        if args.engine_address:
            raise CommandError("--engine-address is for --engine ray; the local engine runs in this process.")
        return None
    try:
        return ray_mapper(args.engine_address, num_workers=args.workers)
    except ImportError as error:
        raise CommandError(one_line(error)) from error


# ------------------------------------------------------------------------------------------ FAISS and LanceDB
def _target(args) -> str:
    """What is edited: ``"lancedb"`` (a table in place), ``"faiss"`` (a FAISS index alone) or ``"index"``."""
    from ..index.faiss_index import FAISS_SUFFIXES

    faiss_options = args.faiss_index or args.faiss_output
    if args.lancedb:
        if not args.table or args.input or args.output or faiss_options or args.engine != "local":
            raise CommandError("--lancedb URI edits the table named by --table in place: give --table, and leave out "
                               "--input, --output, --faiss-* and --engine.")  # fmt: skip
        return "lancedb"
    if not args.input or not args.output or args.table:
        raise CommandError("Give --input and --output (an index written anew), or --lancedb URI --table NAME (a "
                           "LanceDB table edited in place).")  # fmt: skip
    if args.input.endswith(FAISS_SUFFIXES):
        if faiss_options or args.engine != "local":
            raise CommandError("--input is a FAISS index, edited alone in this process: leave out --faiss-index, "
                               "--faiss-output and --engine (to rebuild it from its vectors, give them as --input "
                               "and the index as --faiss-index).")  # fmt: skip
        return "faiss"
    if args.faiss_output and not args.faiss_index:
        raise CommandError("--faiss-output names the index rebuilt from --faiss-index: give --faiss-index too.")
    return "index"


def _faiss_finish(args, edit):
    from ..index.faiss_index import faiss_rebuilder

    if not args.faiss_index:
        return None
    return faiss_rebuilder(edit, args.faiss_index, args.input, args.output, column=args.column,
                           name=args.faiss_output, train_rows=args.faiss_train_rows)  # fmt: skip


def _print_faiss(section: dict) -> None:
    trained = f", trained anew on {section['trained']['rows']} edited vectors" if section["trained"] else ""
    print(f"rebuilt the FAISS index {section['factory']} ({section['metric']}, {section['ntotal']} vectors"
          f"{trained}) → {section['file']}")  # fmt: skip


def _edit_faiss_alone(args, edit) -> int:
    from ..index.faiss_index import edit_faiss_index

    try:
        result = edit_faiss_index(edit, args.input, args.output, normalized=args.normalized,
                                  train_rows=args.faiss_train_rows)  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as error:
        raise CommandError(one_line(error)) from error
    print(f"edited the {result.vectors} vectors of {args.input} in {result.seconds:.1f} s → {result.output}; the "
          "input is untouched (revert: use it again).")  # fmt: skip
    _print_faiss(result.provenance["faiss"])
    return 0


def _edit_table(args, edit) -> int:
    from ..index.vector_db import edit_lancedb_table

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}.")
    try:
        result = edit_lancedb_table(edit, args.lancedb, args.table, args.column or "vector",
                                    normalized=args.normalized, batch_size=args.batch_size)  # fmt: skip
    except (ValueError, RuntimeError, ImportError) as error:
        raise CommandError(one_line(error)) from error
    print(
        f"edited {result.vectors} {args.side} vectors of {args.lancedb}::{args.table} in place: version "
        f"{result.version_before} → {result.version} ({'normalised' if result.provenance['normalized'] else 'raw'}, "
        f"forgetting {edit.to_dict()['forgotten']}; indexes recreated: {list(result.indices) or 'none'}) in "
        f"{result.seconds:.1f} s; revert: table.restore({result.version_before})."
    )
    return 0
