"""Measure forgetting on real images: the demo model, every test split, 1 and 3 classes, four edit variants, α sweep.

For each dataset, ``--draws`` forget sets of 1 and of 3 classes are drawn with a fixed seed among its classes
(Caltech-101's clutter class ``BACKGROUND_Google`` excluded). Every class of the split stays a zero-shot candidate.
The variants, all built from class *names* only (no images):

- ``nullspace``: ``I − QQᵀ`` over the forgotten classes' text embeddings (α = 1);
- ``nullspace+shared``: the same, with the direction shared by all of the dataset's class names kept
  (``keep_shared_direction``, the default when ``retain_classes`` are given);
- ``ccup``: CCUP keeping the names of the dataset's other classes (λ = 1000, μ = 100);
- ``ccup+shared``: CCUP with the shared direction kept as well (the default for ``method="ccup"``).

Text embeddings of the class names (80 templates, averaged) are computed once per dataset — the edits are
image-side, so they do not change them — and image features once per dataset (``cached_image_features``).

    python scripts/measure_forgetting.py --data-dir ../shared/data --json docs/forgetting.json --plot-dir docs

prints one row per (dataset, forget set, variant), a summary per (dataset, size, variant), PACS per domain, and the
α sweeps; writes ``<dataset>_alpha_sweep.png`` per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.evaluation import class_embeddings, project_image_features, score_predictions, zero_shot_logits


DATASETS = ("cifar10", "pacs", "caltech101")
EXCLUDED = {"BACKGROUND_Google"}
VARIANTS = {
    "nullspace": {"method": "nullspace", "keep_shared_direction": False},
    "nullspace+shared": {"method": "nullspace", "keep_shared_direction": True},
    "ccup": {"method": "ccup", "keep_shared_direction": False},
    "ccup+shared": {"method": "ccup", "keep_shared_direction": True},
}
SWEEP_VARIANTS = ("nullspace", "nullspace+shared")


def forget_sets(class_names: list[str], draws: int, seed: int) -> list[list[str]]:
    candidates = [name for name in class_names if name not in EXCLUDED]
    rng = random.Random(seed)
    singles = rng.sample(candidates, min(draws, len(candidates)))
    return [[name] for name in singles] + [rng.sample(candidates, 3) for _ in range(draws)]


def classify(model, features, text, forget):
    logits = zero_shot_logits(project_image_features(model, features), text)
    return score_predictions(logits.argmax(dim=-1), features, forget)


def measure(model, features, text, forget: list[str], variant: str, alpha: float = 1.0) -> dict:
    names = list(features.class_names)
    retain = [name for name in names if name not in forget]
    options = VARIANTS[variant]
    uses_retain = options["method"] == "ccup" or options["keep_shared_direction"]
    edited = add_forget_adapter(
        model,
        forget,
        text_embeds=text[[names.index(n) for n in forget]],
        retain_classes=retain if uses_retain else None,
        retain_text_embeds=text[[names.index(n) for n in retain]] if uses_retain else None,
        **({"alpha": alpha} if options["method"] == "nullspace" else {}),  # CCUP has no α (refused if given)
        adapter_name="measured",
        show_progress=False,
        **options,
    )
    after = classify(edited, features, text, forget)
    edited.unload()  # back to the plain model for the next edit
    before = classify(model, features, text, forget)
    return {
        "forget": forget,
        "variant": variant,
        "alpha": alpha,
        "forget_before": before.forget_accuracy,
        "forget_after": after.forget_accuracy,
        "retain_before": before.retain_accuracy,
        "retain_after": after.retain_accuracy,
        "per_domain_class_before": before.per_domain_class,
        "per_domain_class_after": after.per_domain_class,
    }


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], len(row["forget"]), row["variant"]), []).append(row)
    summary = []
    for (dataset, size, variant), members in groups.items():
        deltas = [r["retain_after"] - r["retain_before"] for r in members]
        summary.append(
            {
                "dataset": dataset,
                "classes": size,
                "variant": variant,
                "draws": len(members),
                "forget_before_mean": statistics.mean(r["forget_before"] for r in members),
                "forget_after_mean": statistics.mean(r["forget_after"] for r in members),
                "forget_after_max": max(r["forget_after"] for r in members),
                "retain_delta_mean": statistics.mean(deltas),
                "retain_delta_min": min(deltas),
            }
        )
    return summary


def per_domain(row: dict) -> dict[str, dict[str, float]]:
    """Mean accuracy per domain of the forgotten cells and of the other cells, before and after."""
    table: dict[str, dict[str, list[float]]] = {}
    for when in ("before", "after"):
        for key, value in row[f"per_domain_class_{when}"].items():
            domain, name = key.split("/", 1)
            group = "forgotten" if name in row["forget"] else "others"
            table.setdefault(domain, {}).setdefault(f"{group}_{when}", []).append(value)
    return {domain: {k: statistics.mean(v) for k, v in cells.items()} for domain, cells in table.items()}


def geometry(model, features, text) -> dict[str, float]:
    """How CLIP-like the embedding geometry is: mean cosines image–class, image–true class, class–class."""
    image = torch.nn.functional.normalize(project_image_features(model, features).float(), dim=-1)
    cosines = image @ text.float().T
    between = text.float() @ text.float().T
    off_diagonal = ~torch.eye(len(text), dtype=torch.bool)
    return {
        "image_class_cosine_mean": cosines.mean().item(),
        "image_true_class_cosine_mean": cosines[torch.arange(len(image)), features.labels].mean().item(),
        "images_with_no_positive_wrong_class": (
            cosines.scatter(1, features.labels[:, None], -2.0).max(dim=1).values <= 0
        )
        .float()
        .mean()
        .item(),
        "class_class_cosine_mean": between[off_diagonal].mean().item(),
    }


def plot_sweeps(sweeps: dict[str, list[dict]], before: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(6, 4))
    for variant, style in zip(SWEEP_VARIANTS, ("--", "-"), strict=True):
        points = sweeps[variant]
        alphas = [p["alpha"] for p in points]
        axes.plot(alphas, [100 * p["forget_after"] for p in points], "o" + style, color="tab:red",
                  label=f"forget accuracy, {variant}")  # fmt: skip
        axes.plot(alphas, [100 * p["retain_after"] for p in points], "s" + style, color="tab:blue",
                  label=f"retain accuracy, {variant}")  # fmt: skip
    axes.axhline(100 * before["retain_before"], color="tab:blue", ls=":", lw=1, label="retain, before")
    axes.set_xlabel("α (nullspace strength)")
    axes.set_ylabel("zero-shot accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo", help="`demo` (the embedded default), a Hub id or a local path")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,0.9,1")
    parser.add_argument("--draws", type=int, default=3, help="forget sets of each size per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot-dir", default=None, help="write <dataset>_alpha_sweep.png here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    rows, sweeps, domains, geometries = [], {}, {}, {}
    for name in args.datasets.split(","):
        path = os.path.join(args.data_dir, name, "test.parquet")
        features = cached_image_features(model, image_processor, path, "test", args.model)
        text = class_embeddings(model, tokenizer, features.class_names)
        geometries[name] = geometry(model, features, text)
        sets = forget_sets(list(features.class_names), args.draws, args.seed)
        for forget in sets:
            for variant in VARIANTS:
                rows.append({"dataset": name, **measure(model, features, text, forget, variant)})
                if features.domains is not None:
                    domains[f"{name}: {', '.join(forget)} ({variant})"] = per_domain(rows[-1])
        single = sets[0]
        alphas = [float(a) for a in args.alphas.split(",")]
        sweeps[name] = {
            v: [measure(model, features, text, single, v, alpha=a) for a in alphas] for v in SWEEP_VARIANTS
        }
        if args.plot_dir:
            title = f"{name}: forgetting {single[0]!r} ({args.model} model)"
            path = os.path.join(args.plot_dir, f"{name}_alpha_sweep.png")
            plot_sweeps(sweeps[name], sweeps[name]["nullspace"][0], title, path)

    for name, values in geometries.items():
        print(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in values.items()))
    print(f"{'dataset':<11} {'forgotten':<34} {'variant':<17} {'forget acc':>17} {'retain acc':>17} {'Δ retain':>9}")
    for row in rows:
        label = ", ".join(row["forget"])[:34]
        forget = f"{100 * row['forget_before']:5.1f} → {100 * row['forget_after']:5.1f}%"
        retain = f"{100 * row['retain_before']:5.1f} → {100 * row['retain_after']:5.1f}%"
        delta = 100 * (row["retain_after"] - row["retain_before"])
        print(f"{row['dataset']:<11} {label:<34} {row['variant']:<17} {forget:>17} {retain:>17} {delta:+8.1f}")
    summary = summarise(rows)
    print(f"\n{'dataset':<11} {'k':>2} {'variant':<17} {'forget after: mean / max':>25} {'Δ retain: mean / min':>22}")
    for s in summary:
        forget = f"{100 * s['forget_after_mean']:5.1f} / {100 * s['forget_after_max']:5.1f} %"
        delta = f"{100 * s['retain_delta_mean']:+5.1f} / {100 * s['retain_delta_min']:+5.1f}"
        print(f"{s['dataset']:<11} {s['classes']:>2} {s['variant']:<17} {forget:>25} {delta:>22}")
    for label, table in domains.items():
        print(f"\nper domain, {label}: forgotten cells before → after | other cells before → after")
        for domain, cells in table.items():
            print(
                f"  {domain:<13} {100 * cells['forgotten_before']:5.1f} → {100 * cells['forgotten_after']:5.1f}%"
                f"   | {100 * cells['others_before']:5.1f} → {100 * cells['others_after']:5.1f}%"
            )
    for name, by_variant in sweeps.items():
        for variant, sweep in by_variant.items():
            print(f"\nα sweep, {name}, {variant}, forgetting {sweep[0]['forget']}:")
            for r in sweep:
                print(
                    f"  α={r['alpha']:<5} forget {100 * r['forget_after']:5.1f}%  retain {100 * r['retain_after']:5.1f}%"
                )
    if args.json:
        sweep_rows = [r for by_variant in sweeps.values() for sweep in by_variant.values() for r in sweep]
        for row in rows + sweep_rows:  # the per-domain tables above summarise these
            row.pop("per_domain_class_before"), row.pop("per_domain_class_after")
        with open(args.json, "w") as handle:
            json.dump(
                {"geometry": geometries, "summary": summary, "rows": rows, "per_domain": domains, "sweeps": sweeps},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
