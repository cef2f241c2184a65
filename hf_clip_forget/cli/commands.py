"""The commands: ``forget``, ``verify``, ``eval``, ``sweep`` and ``demo``."""

from __future__ import annotations

import json
import os
import sys

import torch

from .loading import (
    CommandError,
    cached_image_features,
    check_output_path,
    command_processes,
    load_adapter,
    load_data,
    load_dual_encoder,
    load_processor,
    model_family,
    one_line,
    require_image_classifier,
)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _templates(values: list[str] | None):
    """``--templates imagenet`` names a built-in set; several values (or one with ``{}``) are format strings."""
    if values and len(values) == 1 and "{}" not in values[0]:
        return values[0]
    return values


def refuse_forgetting_every_class(dataset, forget, flags: str) -> None:
    """A :class:`CommandError` when ``forget`` names every class that has images in ``dataset`` (``load_data``'s):
    no image of a kept class is left, so no retain accuracy can be measured — and an edit forgetting every class
    leaves a model that recognises nothing. ``flags`` names the options that chose the classes. Reads the label
    column only (no image is decoded)."""
    from ..evaluation import resolve_columns

    label = resolve_columns(dataset).label
    names = list(dataset.features[label].names)
    present = [names[i] for i in sorted(set(dataset.unique(label)))]
    if present and set(present) <= set(forget or ()):
        raise CommandError(
            f"{flags} forgets every class of --data ({', '.join(present)}), so no image of a kept class is left and "
            "no retain accuracy can be measured; forgetting every class leaves a model that recognises nothing. "
            "Forget fewer classes, or give --data with images of the classes to keep."
        )


def command_forget(args) -> int:
    from ..api import add_forget_adapter

    command_processes("forget")
    # the image processor only for what needs one: prototypes (their input size) and a merged save (to ship it)
    model, tokenizer, image_processor = load_dual_encoder(
        args.model, image_processor=bool(args.prototypes or args.merge)
    )
    _check_forget_request(model, args)
    preprocessors = _merged_preprocessors(args, model, tokenizer, image_processor) if args.merge else {}
    edited = add_forget_adapter(
        model,
        _split(args.classes),
        tokenizer,
        retain_classes=_split(args.retain_classes),
        alpha=args.alpha,
        method=args.method,
        ccup_lambda=args.ccup_lambda,
        ccup_mu=args.ccup_mu,
        templates=_templates(args.templates),
        target=args.target,
        keep_shared_direction=False if args.no_keep_shared_direction else None,
        domains=_split(args.domains),
        retain_domains=_split(args.retain_domains),
        paradigm=args.paradigm,
        prototypes=args.prototypes,
        prototype_options={"steps": args.prototype_steps, "seed": args.seed} if args.prototypes else None,
        image_processor=image_processor if args.prototypes else None,
        expand_neighbours=args.expand_neighbours,
    )
    audit = None
    if args.audit:
        audit = edited.audit_forgetting(tokenizer)
        print(audit)
    if args.merge:
        edited.save_merged_pretrained(args.output, audit=audit, **preprocessors)  # usable as saved: pipeline()
    else:
        edited.save_pretrained(args.output, audit=audit)
    print(f"forgot {edited.forgotten_classes} → {args.output} ({'merged model' if args.merge else 'adapter'})")
    if args.push_to_hub:
        commit = edited.push_to_hub(args.push_to_hub, merged=args.merge, audit=audit, **preprocessors)
        print(f"pushed to {args.push_to_hub}: {commit.commit_url}")
    return 0


def _check_forget_request(model, args) -> None:
    """Refuse, before any work, what the model's kind of input rules out (its family says which)."""
    family, name = model_family(model), type(model).__name__
    if args.prototypes and not family.supports_prototypes:
        raise CommandError(
            f"--prototypes synthesises whole pixel images whose embedding matches a prompt, which {name} does not "
            "take (it embeds detected boxes, audio, or images cut into patches): drop --prototypes (the edit is "
            "built from the class names' text embeddings)."
        )
    if args.merge and args.push_to_hub and family.inputs != "image":
        raise CommandError(
            f"--push-to-hub with --merge uploads an image processor with the model, and {name} takes "
            f"{family.inputs}: push the adapter (drop --merge), or save with --merge and upload the folder."
        )


def _merged_preprocessors(args, model, tokenizer, image_processor) -> dict:
    """What a merged save carries so that it works as saved: tokenizer and image processor, or, for a model whose
    other input is not an image (CLAP), the checkpoint's processor (tokenizer and feature extractor)."""
    if model_family(model).inputs != "image":
        return {"processor": load_processor(args.model)}
    return {"tokenizer": tokenizer, "image_processor": image_processor}


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


def _eval_forget_classes(args, model) -> tuple[list[str], str]:
    """The classes ``eval`` scores as forgotten (``--forget``, else the loaded adapter's active ones) and the flag
    that named them."""
    if args.forget:
        return _split(args.forget), f"--forget {args.forget!r}"
    active = [name for name in getattr(model, "active_adapters", []) if name in getattr(model, "peft_config", {})]
    classes = list(dict.fromkeys(c for name in active for c in model.peft_config[name].forgotten_classes))
    return classes, f"--adapter {args.adapter!r} (forgetting {', '.join(classes)})"


def command_eval(args) -> int:
    from ..evaluation import ForgettingReport, evaluate_edit, evaluate_zero_shot

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
        refuse_forgetting_every_class(data[0], *_eval_forget_classes(args, model))
    features, shared = _features(args, state, data, *pairs)
    if not state.is_main_process:
        return 0  # the main process evaluates and reports
    options = dict(templates=_templates(args.templates), show_progress=False)
    if args.adapter:
        report = evaluate_edit(model, features[0], _split(args.forget), tokenizer=tokenizer, **options)
    elif args.reference:
        before = evaluate_zero_shot(
            reference, features[1], _split(args.forget), tokenizer=reference_tokenizer, **options
        )
        after = evaluate_zero_shot(model, features[0], _split(args.forget), tokenizer=tokenizer, **options)
        report = ForgettingReport(before=before, after=after)
        note = "the vision towers " + (
            "are identical: both columns use the same image features"
            if shared
            else "or image processors differ: each column uses its own model's image features"
        )
    else:
        zero_shot = evaluate_zero_shot(model, features[0], _split(args.forget), tokenizer=tokenizer, **options)
        report = ForgettingReport(before=zero_shot, after=zero_shot)
    if note:
        print(note, file=sys.stderr)
    result = {**report.to_dict(), "models": models}
    _print_report(result)
    _write_json(args.json, result)
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    try:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
    except OSError as error:
        raise CommandError(f"cannot write --json {path!r}: {one_line(error)}") from error


def _alphas(value: str) -> list[float]:
    try:
        return [float(a) for a in _split(value)]
    except ValueError:
        raise CommandError(f"--alphas {value!r}: give numbers in [0, 1], comma-separated, e.g. 0,0.5,1.") from None


def command_sweep(args) -> int:
    from ..api import add_forget_adapter
    from ..evaluation import evaluate_edit

    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    classes, alphas = _split(args.classes), _alphas(args.alphas)
    state = command_processes("sweep")
    with state.main_process_first():  # a first run fills caches (Hub, datasets, the demo model): one writer
        model, tokenizer, image_processor = load_dual_encoder(args.model)
        require_image_classifier(model, "sweep")
        data = load_data(args.data, args.split)
        refuse_forgetting_every_class(data[0], classes, f"--classes {args.classes!r}")
    (features,), _ = _features(args, state, data, (model, image_processor))
    if not state.is_main_process:
        return 0  # the main process edits, evaluates and reports
    # the data's other class names (names only) define the shared direction the edit keeps
    retain = None if args.no_keep_shared_direction else [c for c in features.class_names if c not in classes]
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
    _write_json(args.json, {"classes": classes, "retain_classes": retain, "before": before.to_dict(), "sweep": rows})
    return 0


def plot_sweep(rows, before, classes, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in rows]
    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    axes.plot(alphas, [100 * r["forget_accuracy"] for r in rows], "o-", color="tab:red", label="forget accuracy")
    axes.plot(alphas, [100 * r["retain_accuracy"] for r in rows], "o-", color="tab:blue", label="retain accuracy")
    axes.axhline(100 * before.retain_accuracy, color="tab:blue", ls=":", lw=1, label="retain, before")
    axes.set_xlabel("α (nullspace strength)")
    axes.set_ylabel("zero-shot accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.set_title(f"Forgetting {', '.join(classes)}: the α trade-off", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def command_demo(args) -> int:
    """Forget classes from the embedded default model and show what changes, on the shipped demo images."""
    from importlib import resources

    from PIL import Image

    from ..api import add_forget_adapter
    from ..core import IMAGENET_TEMPLATES, class_text_embeddings

    command_processes("demo")
    model, tokenizer, image_processor = load_dual_encoder("demo")
    folder = resources.files("hf_clip_forget").joinpath("demo_images")
    entries = json.loads(folder.joinpath("images.json").read_text())
    images = [Image.open(folder.joinpath(entry["file"])).convert("RGB") for entry in entries]
    labels = [entry["label"] for entry in entries]
    classes = sorted(set(labels))
    forget = _split(args.classes)
    unknown = sorted(set(forget) - set(classes))
    if unknown:
        raise ValueError(f"The demo images show {classes}; {unknown} is not among them. Pick from those.")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]

    def predict(target) -> list[str]:
        text = class_text_embeddings(target, tokenizer, classes, IMAGENET_TEMPLATES, show_progress=False)
        output = target.get_image_features(pixel_values=pixels)
        image = torch.nn.functional.normalize(getattr(output, "pooler_output", output).float(), dim=-1)
        return [classes[i] for i in (image @ text.embeddings.float().T).argmax(dim=1).tolist()]

    before = predict(model)
    others = [c for c in classes if c not in forget]
    edited = add_forget_adapter(model, forget, tokenizer, retain_classes=others or None, show_progress=False)
    after = predict(edited)
    print("\nhf-clip-forget demo — the embedded default model (EfficientNet-Lite0 + all-MiniLM-L6-v2; not CLIP)")
    print(f"forgetting {forget} by name: a nullspace projection of visual_projection, no data, no training")
    print(f"(the direction they share with the other classes, {others}, is kept)\n")
    print(f"{'image':<14} {'true class':<10} {'before':<10} {'after':<10}")
    for entry, label, old, new in zip(entries, labels, before, after, strict=True):
        mark = "  ← forgotten" if label in forget else ""
        print(f"{entry['file']:<14} {label:<10} {old:<10} {new:<10}{mark}")

    def accuracy(predictions: list[str], keep: bool) -> float:
        pairs = [(p, t) for p, t in zip(predictions, labels, strict=True) if (t in forget) != keep]
        return 100 * sum(p == t for p, t in pairs) / max(len(pairs), 1)

    print(f"\n{'accuracy on these images':<26} {'before':>7} {'after':>7}")
    print(f"{'forgotten classes':<26} {accuracy(before, False):6.0f}% {accuracy(after, False):6.0f}%")
    print(f"{'other classes':<26} {accuracy(before, True):6.0f}% {accuracy(after, True):6.0f}%")
    if args.data:
        from ..evaluation import evaluate_edit

        features = cached_image_features(model, image_processor, args.data, "test", "demo")
        _print_report(evaluate_edit(edited, features, forget, tokenizer=tokenizer).to_dict())
    print("\nImages: PACS (Li et al., ICCV 2017), see hf_clip_forget/demo_images/CREDITS.md.")
    return 0


def _print_report(result: dict) -> None:
    before, after = result["before"], result["after"]
    for column, model in result.get("models", {}).items():
        print(f"{column + ':':7} {model}")
    print(f"{'':18} {'before':>8} {'after':>8}")
    for key in ("forget_accuracy", "retain_accuracy"):
        if before.get(key) is not None:
            print(f"{key:18} {100 * before[key]:7.1f}% {100 * after[key]:7.1f}%")
    for name in before["per_class"]:
        print(f"  {name:16} {100 * before['per_class'][name]:7.1f}% {100 * after['per_class'][name]:7.1f}%")


def command_verify(args) -> int:
    """Recompute each adapter from its recorded classes on MODEL and compare with its stored factors."""
    command_processes("verify")
    if args.json:
        check_output_path(args.json, "--json")
    model, tokenizer, image_processor = load_dual_encoder(args.model)
    edited = load_adapter(model, args.adapter)
    report = edited.verify(tokenizer=tokenizer, image_processor=image_processor, tolerance=args.tolerance)
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    if report.ok:
        print(
            f"verified: every adapter's stored edit equals the edit of the classes it names (max |ΔM| ≤ {args.tolerance:g})"
        )
        return 0
    print(
        "NOT VERIFIED: see the rows above (mismatch: the factors do not forget what the config and card say; "
        "invalid: the config describes no edit that can be rebuilt, so what it claims to forget is false)"
    )
    return 1
