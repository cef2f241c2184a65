"""Layer 5 — the ``hf-clip-forget`` command line: ``demo``, ``forget``, ``eval`` and ``sweep``.

MODEL is a Hub id, a local directory, or ``demo`` (the embedded default, assembled offline from PyPI packages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import torch


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _templates(values: list[str] | None):
    """``--templates imagenet`` names a built-in set; several values (or one with ``{}``) are format strings."""
    if values and len(values) == 1 and "{}" not in values[0]:
        return values[0]
    return values


def load_dual_encoder(name_or_path: str):
    """``(model, tokenizer, image_processor)`` for MODEL; a clear error if it is not a dual encoder."""
    from . import models  # noqa: F401  (registers the demo towers' model types before from_pretrained)

    if name_or_path == "demo":
        from .models.demo import load_demo_model

        model, processor = load_demo_model()
        return model, processor.tokenizer, processor.image_processor
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(name_or_path).eval()
    if not all(hasattr(model, name) for name in ("visual_projection", "text_projection", "get_text_features")):
        raise SystemExit(
            f"error: {name_or_path!r} loads as {type(model).__name__}, which is not a CLIP-style dual encoder "
            "(it needs visual_projection, text_projection and get_text_features). Use a CLIPModel or "
            "VisionTextDualEncoderModel checkpoint, or `demo`."
        )
    return model, AutoTokenizer.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path)


def cached_image_features(model, image_processor, data: str, split: str, name_or_path: str, use_cache: bool = True):
    """The pre-projection image features of a labelled image set, computed once per (model, data) and cached."""
    from .evaluation import ImageFeatures, embed_images, load_labelled_images
    from .models.demo import default_cache_dir

    # one cache entry per file, however its path is spelled (the datasets fingerprint depends on the path string)
    data = os.path.realpath(data) if os.path.exists(data) else data
    dataset = load_labelled_images(data, split=split)
    key = json.dumps([name_or_path, dataset._fingerprint, getattr(image_processor, "to_json_string", str)()])
    path = os.path.join(
        default_cache_dir(), "features", hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors"
    )
    if use_cache and os.path.isfile(path):
        return ImageFeatures.load(path)
    features = embed_images(model, dataset, image_processor)
    if use_cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        features.save(path)
    return features


# --------------------------------------------------------------------------------------------------- commands
def command_forget(args) -> int:
    from .api import add_forget_adapter

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    edited = add_forget_adapter(
        model,
        _split(args.classes),
        tokenizer,
        retain_classes=_split(args.retain_classes),
        alpha=args.alpha,
        method=args.method,
        templates=_templates(args.templates),
        target=args.target,
        keep_shared_direction=False if args.no_keep_shared_direction else None,
        domains=_split(args.domains),
        retain_domains=_split(args.retain_domains),
        paradigm=args.paradigm,
        prototypes=args.prototypes,
        prototype_options={"steps": args.prototype_steps, "seed": args.seed} if args.prototypes else None,
        image_processor=image_processor if args.prototypes else None,
    )
    if args.merge:
        edited.save_merged_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        image_processor.save_pretrained(args.output)
    else:
        edited.save_pretrained(args.output)
    print(f"forgot {edited.forgotten_classes} → {args.output} ({'merged model' if args.merge else 'adapter'})")
    if args.push_to_hub:
        commit = edited.push_to_hub(args.push_to_hub, merged=args.merge)
        print(f"pushed to {args.push_to_hub}: {commit.commit_url}")
    return 0


def command_eval(args) -> int:
    from .api import ForgetPeftModel
    from .evaluation import evaluate_edit

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    features = cached_image_features(model, image_processor, args.data, args.split, args.model, not args.no_cache)
    if args.adapter:
        model = ForgetPeftModel.from_pretrained(model, args.adapter)
        report = evaluate_edit(
            model, features, _split(args.forget), tokenizer=tokenizer, templates=_templates(args.templates)
        )
    else:
        if not args.forget:
            raise SystemExit("error: give --adapter (whose forgotten classes are used) or --forget CLASSES.")
        from .evaluation import evaluate_zero_shot

        print("no --adapter: 'before' and 'after' are the same, unedited model", file=sys.stderr)
        zero_shot = evaluate_zero_shot(
            model, features, _split(args.forget), tokenizer=tokenizer, templates=_templates(args.templates)
        )
        from .evaluation import ForgettingReport

        report = ForgettingReport(before=zero_shot, after=zero_shot)
    result = report.to_dict()
    _print_report(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


def command_sweep(args) -> int:
    from .api import add_forget_adapter
    from .evaluation import evaluate_edit

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    features = cached_image_features(model, image_processor, args.data, args.split, args.model, not args.no_cache)
    classes = _split(args.classes)
    # the data's other class names (names only) define the shared direction the edit keeps
    retain = None if args.no_keep_shared_direction else [c for c in features.class_names if c not in classes]
    alphas = [float(a) for a in _split(args.alphas)]
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
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"classes": classes, "retain_classes": retain, "before": before.to_dict(), "sweep": rows},
                handle,
                indent=2,
            )
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

    from .api import add_forget_adapter
    from .core import IMAGENET_TEMPLATES, class_text_embeddings

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
        from .evaluation import evaluate_edit

        features = cached_image_features(model, image_processor, args.data, "test", "demo")
        _print_report(evaluate_edit(edited, features, forget, tokenizer=tokenizer).to_dict())
    print("\nImages: PACS (Li et al., ICCV 2017), see hf_clip_forget/demo_images/CREDITS.md.")
    return 0


def _print_report(result: dict) -> None:
    before, after = result["before"], result["after"]
    print(f"{'':18} {'before':>8} {'after':>8}")
    for key in ("forget_accuracy", "retain_accuracy"):
        if before.get(key) is not None:
            print(f"{key:18} {100 * before[key]:7.1f}% {100 * after[key]:7.1f}%")
    for name in before["per_class"]:
        print(f"  {name:16} {100 * before['per_class'][name]:7.1f}% {100 * after['per_class'][name]:7.1f}%")


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-clip-forget",
        description="Forget classes from CLIP-style dual encoders by name: no data, no training.",
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
    forget.add_argument("--alpha", type=float, default=1.0, help="nullspace strength in [0, 1]")
    forget.add_argument(
        "--method",
        choices=["nullspace", "ccup"],
        default=None,
        help="default: ccup with --domains (paradigm domain/complete), nullspace otherwise",
    )
    forget.add_argument("--target", choices=["visual", "text", "both"], default="visual")
    forget.add_argument("--templates", nargs="+", default=None, help="'imagenet', 'single' or format strings with {}")
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
    forget.set_defaults(handler=command_forget)

    for name, help_text in (("eval", "zero-shot accuracy before/after an adapter"), ("sweep", "α trade-off curve")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", help="Hub id, local path, or `demo`")
        sub.add_argument("--data", required=True, help="parquet file/folder, image folder, or Hub dataset id")
        sub.add_argument("--split", default="test")
        sub.add_argument("--json", default=None, help="write the results here")
        sub.add_argument("--no-cache", action="store_true", help="do not reuse cached image features")
        if name == "eval":
            sub.add_argument("--adapter", default=None, help="a saved forget adapter (directory or Hub id)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
