"""The commands that measure on labelled images: ``eval`` (zero-shot accuracy before/after an edit) and ``sweep`` (the
α trade-off), and the before/after table both print (with the forgotten classes per domain when the data has
domains)."""

from __future__ import annotations

import os
import sys

from .arguments import (
    names_option,
    refuse_classes_not_in_data,
    refuse_forgetting_every_class,
    split_names,
    templates_option,
    write_json,
)
from .loading import (
    CommandError,
    command_processes,
    load_adapter,
    load_data,
    load_dual_encoder,
    require_image_classifier,
)


def _features(args, state, data, *pairs):
    """Image features of ``data`` (``load_data``'s ``(dataset, source)``) for each ``(model, image_processor)``:
    embedded (shared among the processes) once per distinct cache key, so models that share their vision tower
    and image processor share their features. Also returns whether all of them did."""
    from ..evaluation import features_cache_path, image_features_key, load_or_embed_image_features

    dataset, source = data
    computed, result, sources = {}, [], []
    for model, image_processor in pairs:
        key = image_features_key(model, image_processor, dataset, source)
        if key not in computed:
            cached = not args.no_cache and os.path.isfile(features_cache_path(key))
            sources.append("read from the cache" if cached else f"embedded by {state.num_processes} processes")
            computed[key] = load_or_embed_image_features(
                key,
                model,
                image_processor,
                dataset,
                use_cache=not args.no_cache,
                accelerator=state,
                batch_size=args.batch_size,
            )
        result.append(computed[key])
    if state.num_processes > 1 and state.is_main_process:
        print(f"image features of {len(dataset)} images: {', '.join(sources)}", file=sys.stderr)
    return result, len(computed) == 1


def _eval_models(args) -> tuple[dict, str]:
    if args.adapter and args.reference:
        raise CommandError(
            "give --adapter (an adapter to evaluate on MODEL) or --reference (the original of a merged MODEL), "
            "not both."
        )
    if not args.adapter and not args.forget:
        raise CommandError(
            "give --forget CLASSES (the classes the edit forgot), or --adapter (whose forgotten classes are used)."
        )
    if args.adapter:
        return {"before": f"{args.model} (adapter bypassed)", "after": f"{args.model} + adapter {args.adapter}"}, ""
    if args.reference:
        return {"before": args.reference, "after": args.model}, ""
    note = "no --adapter or --reference: 'before' and 'after' are the same, unedited model"
    return {"before": args.model, "after": args.model}, note


def _active_configs(model) -> list:
    """The configs of the active forget adapters of a loaded ``--adapter`` (none for a plain model)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return []
    return [model.peft_config[name] for name in model.active_adapters if name in model.peft_config]


def _eval_forget_classes(args, model, dataset) -> list[str]:
    """The classes ``eval`` scores as forgotten (``--forget``, else the loaded adapter's active ones), checked
    against ``--data`` (each a class of it, not all of them), the error naming the flag that chose them."""
    forget = names_option(args, "forget", "--forget")
    if forget is not None:
        flags, fix = f"--forget {args.forget!r}", "name them as its labels do"
    else:
        forget = list(dict.fromkeys(c for config in _active_configs(model) for c in config.forgotten_classes))
        flags = f"--adapter {args.adapter!r} (forgetting {', '.join(forget)})"
        fix = "give --forget with the classes of --data to score as forgotten"
    refuse_classes_not_in_data(dataset, forget, flags, fix)
    refuse_forgetting_every_class(dataset, forget, flags)
    return forget


def _forgotten_domains(model) -> list[str] | None:
    """The domains the active adapters forget their classes in; ``None`` (every domain) for a global edit, or
    without an adapter."""
    configs = _active_configs(model)
    if not configs or any(config.paradigm == "global" for config in configs):
        return None
    return sorted({domain for config in configs for domain in config.domains})


def command_eval(args) -> int:
    from ..evaluation import ForgettingReport, evaluate_edit, evaluate_zero_shot
    from ..evaluation.reports import images_per_cell
    from .loading import check_output_path

    check_output_path(args.json, "--json")
    models, note = _eval_models(args)
    state = command_processes("eval")
    with state.main_process_first():  # a first run fills caches (Hub, datasets, the demo model): one writer
        model, tokenizer, image_processor = load_dual_encoder(args.model)
        require_image_classifier(model, "eval")
        pairs = [(model, image_processor)]
        if args.adapter:
            model = load_adapter(model, args.adapter)
        if args.reference:
            reference, reference_tokenizer, reference_processor = load_dual_encoder(args.reference)
            require_image_classifier(reference, "eval")
            pairs.append((reference, reference_processor))
        data = load_data(args.data, args.split)
        forget = _eval_forget_classes(args, model, data[0])
    features, shared = _features(args, state, data, *pairs)
    if not state.is_main_process:
        return 0  # the main process evaluates and reports
    options = dict(templates=templates_option(args.templates), show_progress=False)
    if args.adapter:
        report = evaluate_edit(model, features[0], forget, tokenizer=tokenizer, **options)
    elif args.reference:
        before = evaluate_zero_shot(reference, features[1], forget, tokenizer=reference_tokenizer, **options)
        after = evaluate_zero_shot(model, features[0], forget, tokenizer=tokenizer, **options)
        report = ForgettingReport(before=before, after=after)
        note = "the vision towers " + (
            "are identical: both columns use the same image features"
            if shared
            else "or image processors differ: each column uses its own model's image features"
        )
    else:
        zero_shot = evaluate_zero_shot(model, features[0], forget, tokenizer=tokenizer, **options)
        report = ForgettingReport(before=zero_shot, after=zero_shot)
    if note:
        print(note, file=sys.stderr)
    result = {**report.to_dict(), "models": models}
    print_report(result, _forgotten_domains(model), images_per_cell(features[0]))
    write_json(args.json, result)
    return 0


def _alphas(value: str) -> list[float]:
    try:
        return [float(a) for a in split_names(value)]
    except ValueError:
        raise CommandError(f"--alphas {value!r}: give numbers in [0, 1], comma-separated, e.g. 0,0.5,1.") from None


def command_sweep(args) -> int:
    from ..api import add_forget_adapter
    from ..evaluation import evaluate_edit
    from .loading import check_output_path

    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    classes, alphas = names_option(args, "classes", "--classes"), _alphas(args.alphas)
    state = command_processes("sweep")
    with state.main_process_first():  # a first run fills caches (Hub, datasets, the demo model): one writer
        model, tokenizer, image_processor = load_dual_encoder(args.model)
        require_image_classifier(model, "sweep")
        data = load_data(args.data, args.split)
        refuse_classes_not_in_data(data[0], classes, f"--classes {args.classes!r}")
        refuse_forgetting_every_class(data[0], classes, f"--classes {args.classes!r}")
    (features,), _ = _features(args, state, data, (model, image_processor))
    if not state.is_main_process:
        return 0  # the main process edits, evaluates and reports
    # the data's other class names (names only) define the shared direction the edit keeps
    forgotten = set(classes)
    retain = None if args.no_keep_shared_direction else [c for c in features.class_names if c not in forgotten]
    edited, rows = None, []
    for alpha in alphas:
        name = f"alpha_{len(rows)}"
        target = edited if edited is not None else model
        edited = add_forget_adapter(
            target, classes, tokenizer, retain_classes=retain, alpha=alpha, adapter_name=name, show_progress=False
        )
        edited.set_adapter(name)
        report = evaluate_edit(edited, features, classes, tokenizer=tokenizer, show_progress=False)
        rows.append({"alpha": alpha, **{k: report.after.to_dict()[k] for k in ("forget_accuracy", "retain_accuracy")}})
        before = report.before
    print(f"{'alpha':>6} {'forget acc':>11} {'retain acc':>11}")
    print(f"{'before':>6} {100 * before.forget_accuracy:10.1f}% {100 * before.retain_accuracy:10.1f}%")
    for row in rows:
        print(f"{row['alpha']:6.2f} {100 * row['forget_accuracy']:10.1f}% {100 * row['retain_accuracy']:10.1f}%")
    if args.plot:
        plot_sweep(rows, before, classes, args.plot)
        print(f"plot → {args.plot}")
    write_json(args.json, {"classes": classes, "retain_classes": retain, "before": before.to_dict(), "sweep": rows})
    return 0


def plot_sweep(rows, before, classes, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in rows]
    figure, axes = plt.subplots(figsize=(5.5, 4.2), dpi=120, layout="constrained")
    axes.plot(alphas, [100 * r["forget_accuracy"] for r in rows], "o-", color="tab:red", label="forget accuracy")
    axes.plot(alphas, [100 * r["retain_accuracy"] for r in rows], "o-", color="tab:blue", label="retain accuracy")
    axes.axhline(100 * before.retain_accuracy, color="tab:blue", ls=":", lw=1, label="retain, before")
    axes.set_xlabel("α (nullspace strength)")
    axes.set_ylabel("zero-shot accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.set_title(f"Forgetting {', '.join(classes)}: the α trade-off", fontsize=10)
    axes.grid(alpha=0.3)
    # below the axes: inside, wherever it went, it covered points (α = 0's forget accuracy, issue 21)
    figure.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    figure.savefig(path)
    plt.close(figure)


def print_report(result: dict, forget_domains=None, images: dict[str, int] | None = None) -> None:
    """The before/after table of a :class:`~hf_clip_forget.evaluation.ForgettingReport` dict: the models, forget and
    retain accuracy, each class, and — when the data has domains — the forgotten classes per domain (the forgotten
    cells, then the class in the kept domains), which a pooled number hides."""
    before, after = result["before"], result["after"]
    for column, model in result.get("models", {}).items():
        print(f"{column + ':':7} {model}")
    print(f"{'':18} {'before':>8} {'after':>8}")
    for key in ("forget_accuracy", "retain_accuracy"):
        if before.get(key) is not None:
            print(f"{key:18} {100 * before[key]:7.1f}% {100 * after[key]:7.1f}%")
    for name in before["per_class"]:
        print(f"  {name:16} {100 * before['per_class'][name]:7.1f}% {100 * after['per_class'][name]:7.1f}%")
    _print_domain_rows(result, forget_domains, images)


def _print_domain_rows(result: dict, forget_domains, images) -> None:
    from ..evaluation.reports import forgotten_class_cells

    before, after = result["before"].get("per_domain_class"), result["after"].get("per_domain_class")
    if not before or not after:
        return
    rows = forgotten_class_cells(before, after, result["before"]["forget_classes"], forget_domains, images)
    if not rows:
        return
    width = max(len(f"{row.name} ({row.role})") for row in rows)
    print(f"\n{'forgotten classes per domain':{width + 2}} {'before':>8} {'after':>8}")
    for row in rows:
        label = f"{row.name} ({row.role})"
        print(f"  {label:{width}} {100 * row.before:7.1f}% {100 * row.after:7.1f}%")
