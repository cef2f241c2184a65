"""Measure domain-aware forgetting on PACS: global, domain-specific and complete, text-only vs text + prototypes.

The demo model, PACS test (2,001 images, 7 classes × 4 domains), every class a zero-shot candidate (80 ImageNet
templates averaged, domain-agnostic — the classifier does not know the domain). Each task is run through the public
API (``add_forget_adapter`` with ``domains`` / ``retain_domains`` / ``paradigm`` / ``prototypes``) with text-only
and with text + synthesised visual prototypes, for a few CCUP retain weights μ. Reported per task: the accuracy of
the forgotten (domain, class) cells, of the same class in the kept domains, of the other classes in the forgotten
domain, and of all other cells, before → after, plus the time to build the edit.

    python scripts/measure_domains.py --data-dir ../shared/data --json docs/domains.json

Goals (issue 5): global "dog": ≤ 5 % in every domain, other classes within 2 points; domain-specific "dog" in
sketch: sketch/dog ≤ 5 %, dog in the other domains within 5 points, other sketch classes within 3 points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.evaluation import class_embeddings, project_image_features, score_predictions, zero_shot_logits


GLOBAL_TASKS = (("dog",), ("person",), ("guitar",))
DOMAIN_TASKS = (("dog", "sketch"), ("person", "art_painting"), ("guitar", "cartoon"), ("horse", "photo"))
COMPLETE_TASKS = (("dog", "sketch"), ("person", "art_painting"))


def cell_accuracies(model, features, text) -> dict[str, float]:
    logits = zero_shot_logits(project_image_features(model, features), text)
    return score_predictions(logits.argmax(dim=-1), features).per_domain_class


def groups(before, after, forget_class, forget_domains, domains, classes) -> dict[str, tuple[float, float]]:
    def mean(table, keys):
        return statistics.mean(table[k] for k in keys) if keys else float("nan")

    kept_domains = [d for d in domains if d not in forget_domains]
    keys = {
        "forgotten cells": [f"{d}/{forget_class}" for d in forget_domains],
        "same class, kept domains": [f"{d}/{forget_class}" for d in kept_domains],
        "other classes, forgotten domains": [f"{d}/{c}" for d in forget_domains for c in classes if c != forget_class],
        "other classes, kept domains": [f"{d}/{c}" for d in kept_domains for c in classes if c != forget_class],
    }
    result = {name: (mean(before, k), mean(after, k)) for name, k in keys.items() if k}
    kept_cells = [key for name, cells in keys.items() if name != "forgotten cells" for key in cells]
    result["worst kept cell change"] = (0.0, min(after[key] - before[key] for key in kept_cells))
    return result


def plot_tradeoffs(rows: list[dict], path: str) -> None:
    """Domain-specific forgetting: forgotten cells against the same class in kept domains, text vs +prototypes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["class"], r["domains"][0]) for r in rows if r["paradigm"] == "domain"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.3), squeeze=False)
    for axis, (name, domain) in zip(axes[0], tasks, strict=True):
        for prototypes, style in ((0, "o--"), (max(r["prototypes"] for r in rows), "s-")):
            points = [
                r for r in rows
                if r["paradigm"] == "domain" and r["class"] == name and r["prototypes"] == prototypes
            ]  # fmt: skip
            points.sort(key=lambda r: -r["ccup_mu"])
            xs = [100 * r["groups"]["forgotten cells"][1] for r in points]
            ys = [100 * r["groups"]["same class, kept domains"][1] for r in points]
            label = f"text + {prototypes} prototypes" if prototypes else "text only"
            axis.plot(xs, ys, style, label=label)
            for r, x, y in zip(points, xs, ys, strict=True):
                axis.annotate(f"μ={r['ccup_mu']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        before = points[0]["groups"]
        axis.plot(
            [100 * before["forgotten cells"][0]], [100 * before["same class, kept domains"][0]], "k*", label="before"
        )
        axis.axvline(5, color="grey", lw=0.8, ls=":")
        axis.set_title(f"{name} in {domain}", fontsize=9)
        axis.set_xlabel(f"{domain}/{name} accuracy (%)", fontsize=8)
        axis.set_ylabel(f"{name}, other domains (%)", fontsize=8)
        axis.set_xlim(-3, 100), axis.set_ylim(-3, 100)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Domain-specific forgetting on PACS (demo model): ideal is bottom-left x, top y", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prototypes", type=int, default=4, help="prototypes per forget cell in the +prototypes runs")
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps per prototype")
    parser.add_argument("--mus", default="1000,100,10", help="CCUP retain weights μ to try (λ = 1000)")
    parser.add_argument("--quick", action="store_true", help="one task per paradigm, one μ")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write the domain-specific trade-off plot (PNG) here")
    parser.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a saved --json")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as handle:
            plot_tradeoffs(json.load(handle)["rows"], args.plot)
        return
    torch.set_grad_enabled(False)

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    features = cached_image_features(
        model, image_processor, os.path.join(args.data_dir, "pacs", "test.parquet"), "test", args.model
    )
    classes, domains = list(features.class_names), list(features.domain_names)
    text = class_embeddings(model, tokenizer, classes)
    before = cell_accuracies(model, features, text)
    mus = [float(m) for m in args.mus.split(",")][: 1 if args.quick else None]
    tasks = [("global", c, ()) for (c,) in GLOBAL_TASKS[: 1 if args.quick else None]]
    tasks += [("domain", c, (d,)) for c, d in DOMAIN_TASKS[: 1 if args.quick else None]]
    tasks += [("complete", c, (d,)) for c, d in COMPLETE_TASKS[: 1 if args.quick else None]]

    rows = []
    for paradigm, forget_class, forget_domains in tasks:
        others = [c for c in classes if c != forget_class]
        kept = [d for d in domains if d not in forget_domains]
        # global: the default nullspace and CCUP (μ = 100); domain paradigms: CCUP for each μ
        settings = [("nullspace", None), ("ccup", 100.0)] if paradigm == "global" else [("ccup", mu) for mu in mus]
        for method, mu in settings:
            for prototypes in (0, args.prototypes):
                options = {"method": method} | ({"ccup_mu": mu} if mu is not None else {})
                start = time.perf_counter()
                edited = add_forget_adapter(
                    model,
                    [forget_class],
                    tokenizer,
                    retain_classes=others,
                    domains=list(forget_domains) if paradigm != "global" else domains,
                    retain_domains=kept if paradigm != "global" else None,
                    paradigm=paradigm,
                    prototypes=prototypes,
                    prototype_options={"steps": args.steps},
                    image_processor=image_processor,
                    adapter_name="measured",
                    show_progress=False,
                    **options,
                )
                seconds = time.perf_counter() - start
                config = edited.peft_config["measured"]
                after = cell_accuracies(edited, features, text)
                edited.unload()
                summary = groups(before, after, forget_class, forget_domains or domains, domains, classes)
                if paradigm == "global":  # every domain is forgotten: report each one
                    cells = [f"{d}/{forget_class}" for d in domains]
                    summary.update({cell: (before[cell], after[cell]) for cell in cells})
                rows.append(
                    {
                        "paradigm": paradigm,
                        "class": forget_class,
                        "domains": list(forget_domains) or domains,
                        "method": config.method,
                        "ccup_mu": mu,
                        "prototypes": prototypes,
                        "edit_seconds": seconds,
                        "groups": summary,
                    }
                )
                label = f"{paradigm:<8} {forget_class}/{'+'.join(forget_domains) or 'all'}"
                weights = "" if mu is None else f" μ={mu:g}"
                source = f"text + {prototypes} prototypes/cell" if prototypes else "text only"
                setting = f"{config.method}{weights}, {source}"
                print(f"\n{label} — {setting} ({seconds:.0f} s)", flush=True)
                for name, (b, a) in summary.items():
                    print(f"  {name:<34} {100 * b:5.1f} → {100 * a:5.1f} %  ({100 * (a - b):+.1f})", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"before": before, "rows": rows}, handle, indent=2)
    if args.plot:
        plot_tradeoffs(rows, args.plot)


if __name__ == "__main__":
    main()
