"""Audit every edit method the library offers: which probe gets a forgotten class back, and by how much.

The demo model on the test splits of CIFAR-10, Caltech-101 and PACS; per dataset, ``--draws`` forget sets of 1 and of
3 classes (fixed seed). Methods, built from class names only:

- ``nullspace``: remove the forgotten classes' text-embedding span from the image side, no retain names;
- ``nullspace+shared``: the same, keeping the direction all the dataset's class names share;
- ``ccup``: CCUP keeping the dataset's other class names (λ = 1000, μ = 100, shared direction kept);
- ``text-side``: the nullspace edit on the text side (the names' prompts lose their directions; images unchanged);
- PACS only, the domain paradigms on one class in one domain (``domain``: kept in the other domains; ``complete``),
  audited on the images of that domain.

Each edit is audited with :func:`hf_clip_forget.audit.audit_forgetting`: held-out prompts, 5 neighbour names from the
vocabulary, logit margin, and the image probes on the split (the dataset's other classes are the candidates).
``--expand-neighbours K`` also measures the edit with K vocabulary neighbours added to the forget set;
``--time-data-free`` only times a data-free audit (median of 3, with and without the neighbour search).

    python scripts/audit_methods.py --data-dir ../shared/data --json docs/audit.json

prints one line per (dataset, forget set, method, probe) and a summary per (method, probe); writes every row to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.audit import audit_forgetting
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.evaluation import ImageFeatures, evaluate_edit


DATASETS = ("cifar10", "pacs", "caltech101")
EXCLUDED = {"BACKGROUND_Google"}
METHODS = {
    "nullspace": dict(method="nullspace", keep_shared_direction=False, retain=False),
    "nullspace+shared": dict(method="nullspace", keep_shared_direction=True, retain=True),
    "ccup": dict(method="ccup", retain=True),
    "text-side": dict(method="nullspace", target="text", retain=True),
}
DOMAIN_TASKS = (("dog", "sketch"), ("person", "art_painting"))


def forget_sets(class_names, draws: int, seed: int) -> list[list[str]]:
    candidates = [name for name in class_names if name not in EXCLUDED]
    rng = random.Random(seed)
    return [[name] for name in rng.sample(candidates, draws)] + [rng.sample(candidates, 3) for _ in range(draws)]


def audit_one(model, tokenizer, features, forget, options, data=None, expand: int = 0) -> tuple[list[dict], float]:
    options = dict(options)
    names = [name for name in features.class_names if name not in EXCLUDED]
    others = [name for name in names if name not in forget]
    retain = options.pop("retain", True)
    if expand:
        options["expand_neighbours"] = expand
    edited = add_forget_adapter(model, forget, tokenizer, retain_classes=others if retain else None,
                                adapter_name="audited", show_progress=False, **options)  # fmt: skip
    try:
        started = time.perf_counter()
        report = audit_forgetting(edited, tokenizer, candidate_classes=others,
                                  data=features if data is None else data, show_progress=False)  # fmt: skip
        seconds = time.perf_counter() - started
        accuracy = evaluate_edit(edited, features if data is None else data, forget, tokenizer=tokenizer,
                                 show_progress=False).to_dict()  # fmt: skip
    finally:
        edited.unload()
    zero_shot = {
        "probe": "zero-shot accuracy (adapter templates)", "subject": "forget / retain",
        "forget_before": accuracy["before"]["forget_accuracy"], "forget_after": accuracy["after"]["forget_accuracy"],
        "retain_before": accuracy["before"]["retain_accuracy"], "retain_after": accuracy["after"]["retain_accuracy"],
        "verdict": "accuracy",
    }  # fmt: skip
    return [*(dict(row, forget=forget) for row in report.to_dict()["rows"]), dict(zero_shot, forget=forget)], seconds


def time_data_free(model, tokenizer, repeats: int = 3) -> dict:
    """Median wall time of a data-free audit of one CIFAR-10 class (the other nine named), without and with the
    vocabulary neighbour search, with the prompt-embedding cache off (every prompt encoded) and on (warm)."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    edited = add_forget_adapter(model, ["dog"], tokenizer, retain_classes=[c for c in classes if c != "dog"],
                                adapter_name="timed", show_progress=False)  # fmt: skip
    timings = {}
    try:
        for cache in ("0", "1"):
            os.environ["HF_CLIP_FORGET_PROMPT_CACHE"] = cache
            for count in (0, 5):
                audit_forgetting(edited, tokenizer, vocabulary_neighbours=count, show_progress=False)  # warm-up
                runs = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    audit_forgetting(edited, tokenizer, vocabulary_neighbours=count, show_progress=False)
                    runs.append(time.perf_counter() - started)
                label = "prompt cache warm" if cache == "1" else "prompt cache off"
                timings[f"{label}, vocabulary_neighbours={count}"] = statistics.median(runs)
    finally:
        os.environ.pop("HF_CLIP_FORGET_PROMPT_CACHE", None)
        edited.unload()
    timings["load_average"] = os.getloadavg()[0]
    return timings


def domain_images(features: ImageFeatures, domain: str) -> ImageFeatures:
    index = features.domain_names.index(domain)
    keep = features.domains == index
    return ImageFeatures(features.features[keep], features.labels[keep], features.class_names)


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["verdict"] not in ("skipped", "accuracy"):
            key = (row["dataset"], row["method"], len(row["forget"]), row["probe"])
            groups.setdefault(key, []).append(row)
    summary = []
    for (dataset, method, size, probe), members in sorted(groups.items()):
        summary.append({
            "dataset": dataset, "method": method, "classes": size, "probe": probe, "rows": len(members),
            "before_mean": statistics.mean(r["before"] for r in members),
            "after_mean": statistics.mean(r["after"] for r in members),
            "chance_mean": statistics.mean(r["chance"] for r in members),
            "leaks": sum(r["verdict"] == "leaks" for r in members),
            "reduced": sum(r["verdict"] == "reduced" for r in members),
            "gone": sum(r["verdict"] == "gone" for r in members),
        })  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--draws", type=int, default=2, help="forget sets of each size per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--expand-neighbours", type=int, default=0, help="also measure with K neighbours forgotten")
    parser.add_argument("--json", default=None)
    parser.add_argument("--time-data-free", action="store_true", help="only time a data-free audit, and exit")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model, tokenizer, image_processor = load_dual_encoder(args.model)
    if args.time_data_free:
        print(json.dumps(time_data_free(model, tokenizer), indent=1))
        return
    rows, timings = [], []
    variants = [(m, METHODS[m], 0) for m in args.methods.split(",")]
    if args.expand_neighbours:
        variants += [(f"{m}+neighbours", METHODS[m], args.expand_neighbours) for m in args.methods.split(",")]
    for dataset in args.datasets.split(","):
        features = cached_image_features(model, image_processor, os.path.join(args.data_dir, dataset, "test.parquet"),
                                         "test", args.model)  # fmt: skip
        for forget in forget_sets(features.class_names, args.draws, args.seed):
            for method, options, expand in variants:
                found, seconds = audit_one(model, tokenizer, features, forget, options, expand=expand)
                timings.append(seconds)
                rows += [dict(row, dataset=dataset, method=method) for row in found]
                print(f"{dataset} {forget} {method}: {seconds:.1f} s", flush=True)
        if features.domain_names is not None:
            for name, domain in DOMAIN_TASKS:
                others = [d for d in features.domain_names if d != domain]
                for paradigm in ("domain", "complete"):
                    options = dict(method="ccup", domains=[domain], paradigm=paradigm, retain=True)
                    if paradigm == "domain":
                        options["retain_domains"] = others
                    found, _ = audit_one(model, tokenizer, features, [name], options, domain_images(features, domain))
                    rows += [dict(row, dataset=f"{dataset}/{domain}", method=f"ccup {paradigm}") for row in found]
    summary = summarise(rows)
    print(
        f"\n{'dataset':<18} {'method':<26} {'n':>2} {'probe':<28} {'before':>7} {'after':>7} {'chance':>7}  verdicts"
    )
    for s in summary:
        verdicts = f"{s['leaks']} leaks, {s['reduced']} reduced, {s['gone']} gone"
        print(f"{s['dataset']:<18} {s['method']:<26} {s['classes']:>2} {s['probe']:<28} {s['before_mean']:>7.3f} "
              f"{s['after_mean']:>7.3f} {s['chance_mean']:>7.3f}  {verdicts}")  # fmt: skip
    print(f"\n{'dataset':<18} {'method':<26} {'forget':>20} {'forget before→after':>22} {'retain before→after':>22}")
    for row in (r for r in rows if r["verdict"] == "accuracy"):
        print(f"{row['dataset']:<18} {row['method']:<26} {', '.join(row['forget'])[:20]:>20} "
              f"{row['forget_before']:>10.3f} → {row['forget_after']:<9.3f} "
              f"{row['retain_before']:>10.3f} → {row['retain_after']:<9.3f}")  # fmt: skip
    print(f"\naudit time with data: median {statistics.median(timings):.1f} s over {len(timings)} audits")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": "python scripts/audit_methods.py " + " ".join(sys.argv[1:]), "summary": summary,
                       "rows": rows, "audit_seconds": timings}, handle, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
