"""Measure forgetting on real images: the demo model, every test split, 1 and 3 classes, nullspace vs CCUP, α sweep.

For each dataset, the forget sets are drawn with a fixed seed among its classes (Caltech-101's clutter class
``BACKGROUND_Google`` excluded). Every class of the split stays a zero-shot candidate. CCUP's retain set is the
names of the dataset's other classes (names only: still no images). Image features are computed once per dataset
and cached (``hf_clip_forget.cli.cached_image_features``).

    python scripts/measure_forgetting.py --data-dir ../shared/data --json docs/forgetting.json --plot-dir docs

prints one table (forget / retain accuracy before → after, per method) and writes an α-sweep plot per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder, plot_sweep
from hf_clip_forget.evaluation import evaluate_edit


DATASETS = ("cifar10", "pacs", "caltech101")
EXCLUDED = {"BACKGROUND_Google"}


def forget_sets(class_names: list[str], seed: int) -> list[list[str]]:
    candidates = [name for name in class_names if name not in EXCLUDED]
    rng = random.Random(seed)
    return [rng.sample(candidates, 1), rng.sample(candidates, 3)]


def measure(model, tokenizer, features, forget: list[str], method: str, **options) -> dict:
    retain = [name for name in features.class_names if name not in forget] if method == "ccup" else None
    edited = add_forget_adapter(
        model,
        forget,
        tokenizer,
        method=method,
        retain_classes=retain,
        adapter_name="measured",
        show_progress=False,
        **options,
    )
    report = evaluate_edit(edited, features, forget, tokenizer=tokenizer, show_progress=False)
    edited.unload()  # back to the plain model for the next edit
    before, after = report.before, report.after
    return {
        "forget": forget,
        "method": method,
        **options,
        "forget_before": before.forget_accuracy,
        "forget_after": after.forget_accuracy,
        "retain_before": before.retain_accuracy,
        "retain_after": after.retain_accuracy,
        "per_domain_class_after": after.per_domain_class,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,0.9,1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot-dir", default=None, help="write <dataset>_alpha_sweep.png here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model, tokenizer, image_processor = load_dual_encoder("demo")
    rows, sweeps = [], {}
    for name in args.datasets.split(","):
        path = os.path.join(args.data_dir, name, "test.parquet")
        features = cached_image_features(model, image_processor, path, "test", "demo")
        for forget in forget_sets(list(features.class_names), args.seed):
            rows.append({"dataset": name, **measure(model, tokenizer, features, forget, "nullspace", alpha=1.0)})
            rows.append({"dataset": name, **measure(model, tokenizer, features, forget, "ccup")})
        single = forget_sets(list(features.class_names), args.seed)[0]
        sweep = [
            measure(model, tokenizer, features, single, "nullspace", alpha=float(a)) for a in args.alphas.split(",")
        ]
        sweeps[name] = sweep
        if args.plot_dir:
            from hf_clip_forget.evaluation import evaluate_zero_shot

            before = evaluate_zero_shot(model, features, single, tokenizer=tokenizer, show_progress=False)
            points = [
                {"alpha": r["alpha"], "forget_accuracy": r["forget_after"], "retain_accuracy": r["retain_after"]}
                for r in sweep
            ]
            plot_sweep(
                points, before, [f"{name}: {single[0]}"], os.path.join(args.plot_dir, f"{name}_alpha_sweep.png")
            )

    print(f"{'dataset':<11} {'forgotten':<34} {'method':<10} {'forget acc':>17} {'retain acc':>17} {'Δ retain':>9}")
    for row in rows:
        label = ", ".join(row["forget"])[:34]
        forget = f"{100 * row['forget_before']:5.1f} → {100 * row['forget_after']:5.1f}%"
        retain = f"{100 * row['retain_before']:5.1f} → {100 * row['retain_after']:5.1f}%"
        delta = 100 * (row["retain_after"] - row["retain_before"])
        print(f"{row['dataset']:<11} {label:<34} {row['method']:<10} {forget:>17} {retain:>17} {delta:+8.1f}")
    for name, sweep in sweeps.items():
        print(f"\nα sweep, {name}, forgetting {sweep[0]['forget']}:")
        for r in sweep:
            print(
                f"  α={r['alpha']:<5} forget {100 * r['forget_after']:5.1f}%  retain {100 * r['retain_after']:5.1f}%"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "sweeps": sweeps}, handle, indent=2)


if __name__ == "__main__":
    main()
