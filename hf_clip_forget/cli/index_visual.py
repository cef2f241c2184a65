"""``edit-index --erase-visual``: add the index-only visual erasure (``hf_clip_forget.index.visual``) to the adapter's
edit, estimated from a sample of ``--input`` before anything is written."""

from __future__ import annotations

from .loading import CommandError, one_line


def add_visual_arguments(edit) -> None:
    from ..index.visual import DEFAULT_VISUAL_RANK

    edit.add_argument("--erase-visual", action="store_true",
                      help="also erase what the forgotten classes look like in this index, so that image→image "
                      "search forgets them too (a name-built edit leaves it at 2–5× chance): their directions are "
                      "estimated from a sample of --input, its vectors assigned to the nearest of the forgotten and "
                      "the adapter's retain class names. Index-only: the output is then no longer what re-encoding "
                      "with the edited model gives, and its provenance says so (docs/index_forgetting.md)")  # fmt: skip
    edit.add_argument("--visual-rank", type=int, default=DEFAULT_VISUAL_RANK,
                      help=f"contrastive principal directions per forgotten class with --erase-visual (default "
                      f"{DEFAULT_VISUAL_RANK})")  # fmt: skip
    edit.add_argument(
        "--visual-sample",
        type=int,
        default=20_000,
        help="vectors of --input, evenly spaced, the directions are estimated from (default 20000)",
    )


def with_visual(args, edit, model, tokenizer, target: str):
    """``edit``, followed by the visual erasure when ``--erase-visual`` asks for it (printed: what was estimated)."""
    if not args.erase_visual:
        return edit
    from ..index.labels import stored_sample
    from ..index.shards import discover_layout
    from ..index.visual import visual_erasure, with_visual_erasure

    forgotten, competitors = _class_names(args, edit, model, target)
    try:
        sample = stored_sample(discover_layout(args.input, args.side, args.column), args.visual_sample)
        texts = _unedited_text(model, tokenizer, forgotten + competitors)
        erasure = visual_erasure(sample, texts[: len(forgotten)], texts[len(forgotten) :], forgotten, competitors,
                                 edit=edit, rank=args.visual_rank)  # fmt: skip
    except ValueError as error:
        raise CommandError(one_line(error)) from error
    print(
        f"visual erasure (index only): {erasure.basis.shape[1]} directions from {erasure.sample} sampled vectors, "
        f"assigned by nearest name among {len(forgotten) + len(competitors)} — "
        + ", ".join(f"{name}: {count}" for name, count in erasure.members.items())
    )
    return with_visual_erasure(edit, erasure)


def _class_names(args, edit, model, target: str) -> tuple[list[str], list[str]]:
    """The forgotten classes and the competitors (the adapters' retain classes), checked for a visual erasure."""
    if target != "index":
        raise CommandError("--erase-visual estimates from --input's vectors: use it with --input/--output.")
    if args.side == "text":
        raise CommandError("--erase-visual is for an index of images (--side image or audio), not of texts.")
    if args.visual_rank < 0 or args.visual_sample < 1:
        raise CommandError("--visual-rank must be at least 0 and --visual-sample at least 1.")
    configs = [model.peft_config[name] for name in edit.adapters]
    if any(config.paradigm == "domain" and config.domains for config in configs):
        raise CommandError("--erase-visual erases a class in every domain, but this adapter forgets classes in some "
                           "domains only; leave --erase-visual out for it.")  # fmt: skip
    forgotten = list(dict.fromkeys(name for config in configs for name in config.forgotten_classes))
    gone = set(forgotten)
    competitors = [name for name in dict.fromkeys(n for c in configs for n in c.retain_classes) if name not in gone]
    if not competitors:
        raise CommandError("--erase-visual tells the forgotten classes' vectors from the others by their nearest "
                           "class name, and this adapter names no others: build it with --retain-classes (the index's other "
                           "classes).")  # fmt: skip
    return forgotten, competitors


def _unedited_text(model, tokenizer, names: list[str]):
    """Template-averaged text embeddings of ``names`` with every forget adapter off (the unedited model's)."""
    from ..evaluation import class_embeddings

    with model.disable_adapter():
        return class_embeddings(model, tokenizer, names, show_progress=False)
