"""Measure calibration (issue 14): choose the strength on train images (the user's validation data), report on test.

Tasks, all on the demo model, every class of the dataset a zero-shot candidate:

- **global** forgetting of the forget sets of ``scripts/measure_forgetting.py:forget_sets`` (``--draws`` sets of 1
  and of 3 classes, fixed seed) on CIFAR-10, Caltech-101 and PACS, with nullspace and with CCUP; budget: forget
  accuracy ≤ 1 %, retain drop ≤ 1 point;
- **domain-specific** forgetting on PACS (paradigm ``domain``, CCUP, the other three domains kept): dog/sketch,
  person/art_painting, guitar/cartoon, horse/photo; budget: forgotten cell ≤ 5 %, kept images ≥ −5 points.

Validation data: ``stratified_sample(train, --sample, seed)`` of each train split (``scripts/measure_templates.py``),
its features from the image-feature cache under the same key as ``measure_templates.py`` (so neither script embeds
what the other did). Each task is one public call, ``calibrate_forget_adapter(model, classes, tokenizer,
data=<train features>, budget=…, method=…, [domains=…, retain_domains=…, paradigm="domain"])``: the features
are given precomputed, so no image is embedded during a calibration. The calibrated adapter is then evaluated by the
harness on the **test** split (``cached_image_features``): ``class_embeddings`` with the harness's default
templates (the 80-template ensemble: the classifier the calibration judged with, and ``hf-clip-forget eval``'s),
``project_image_features``, ``zero_shot_logits``, ``score_predictions``; "before" is the same model with its edit
bypassed. The forget / kept images of a test split are chosen by the same rule as on the validation data
(``hf_clip_forget.calibration.data.groups``), and the retain drop is the one the budget bounds (for a domain edit the
larger of the kept classes' and the forgotten class's in the kept domains, ``kept_groups``).

    python scripts/measure_calibration.py --data-dir ../shared/data --json docs/calibration.json
    python scripts/measure_calibration.py --data-dir ../shared/data --protocol test-halves \\
        --json docs/calibration.json --update --plot docs/calibration.png

``--require-cached`` stops before any image is embedded when a split's features are not in the cache yet.

The demo model's projections were trained on these train splits (``docs/demo_model.md``), so a train sample is
images the model has seen. ``--protocol test-halves`` is the control: calibrate on one half of the test split (the
even images of every (domain, class) cell) and report on the other half, images the model never saw in either role.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(__file__))
from measure_forgetting import DATASETS, forget_sets  # noqa: E402
from measure_templates import stratified_sample  # noqa: E402

from hf_clip_forget.calibration import calibrate_forget_adapter, read_validation_data  # noqa: E402
from hf_clip_forget.calibration.data import CalibrationRequest, groups, kept_groups  # noqa: E402
from hf_clip_forget.calibration.search import set_strength  # noqa: E402
from hf_clip_forget.cli import cached_image_features, load_dual_encoder  # noqa: E402
from hf_clip_forget.cli.loading import load_data  # noqa: E402
from hf_clip_forget.core.calibration import CalibrationBudget, format_strength, masked_accuracy  # noqa: E402
from hf_clip_forget.evaluation import (  # noqa: E402
    ImageFeatures,
    class_embeddings,
    features_cache_path,
    image_features_key,
    load_or_embed_image_features,
    project_image_features,
    score_predictions,
    zero_shot_logits,
)


GLOBAL_METHODS = ("nullspace", "ccup")
GLOBAL_BUDGET = CalibrationBudget(max_forget=0.01, max_retain_drop=0.01)
DOMAIN_TASKS = (("dog", "sketch"), ("person", "art_painting"), ("guitar", "cartoon"), ("horse", "photo"))
DOMAIN_BUDGET = CalibrationBudget(max_forget=0.05, max_retain_drop=0.05)


def split_features(model, processor, data_dir: str, name: str, split: str, sample: int, seed: int, cached_only: bool):
    """Image features of the train sample or the test split, keyed exactly as ``measure_templates.split_features``."""
    path = os.path.join(data_dir, name, f"{split}.parquet")
    dataset, source = load_data(path, split)
    if split == "train":
        dataset = stratified_sample(dataset, sample, seed)
    key = image_features_key(model, processor, dataset, source)
    if cached_only and not os.path.isfile(features_cache_path(key)):
        raise SystemExit(f"{name} {split}: features not cached yet ({features_cache_path(key)}); run later.")
    if split == "test":
        return cached_image_features(model, processor, path, "test")
    return load_or_embed_image_features(key, model, processor, dataset)


def halves(features: ImageFeatures) -> tuple[ImageFeatures, ImageFeatures]:
    """The even and the odd images of every (domain, class) cell (every class without domains), in order."""
    cells = features.labels
    if features.domains is not None:
        cells = features.domains * len(features.class_names) + features.labels
    seen: dict[int, int] = {}
    rank = []
    for cell in cells.tolist():
        rank.append(seen.get(cell, 0))
        seen[cell] = rank[-1] + 1
    even = torch.tensor(rank) % 2 == 0

    def part(mask: torch.Tensor) -> ImageFeatures:
        domains = None if features.domains is None else features.domains[mask]
        return ImageFeatures(features.features[mask], features.labels[mask], features.class_names, domains,
                             features.domain_names, features.representation)  # fmt: skip

    return part(even), part(~even)


def tasks(names: list[str], dataset: str, draws: int, seed: int) -> list[dict]:
    """The calibrations to run on ``dataset``: global forget sets × methods, and on PACS the domain tasks."""
    found = [
        {"kind": "global", "classes": forget, "method": method, "budget": GLOBAL_BUDGET}
        for forget in forget_sets(names, draws, seed)
        for method in GLOBAL_METHODS
    ]
    if dataset == "pacs":
        domains = ("art_painting", "cartoon", "photo", "sketch")
        found += [
            {"kind": "domain", "classes": [name], "method": "ccup", "budget": DOMAIN_BUDGET, "domains": [domain],
             "retain_domains": [d for d in domains if d != domain], "paradigm": "domain"}
            for name, domain in DOMAIN_TASKS
        ]  # fmt: skip
    return found


@torch.no_grad()
def predictions(model, tokenizer, features, text=None) -> torch.Tensor:
    """``(n,)`` the harness's zero-shot prediction (class index) among all the data's classes, by the classifier
    calibration judges with by default (the harness's: the 80-template ensemble, as ``hf-clip-forget eval``)."""
    if text is None:
        text = class_embeddings(model, tokenizer, list(features.class_names), show_progress=False)
    return zero_shot_logits(project_image_features(model, features), text).argmax(dim=-1)


def scores(before: torch.Tensor, after: torch.Tensor, report, data: ImageFeatures) -> dict:
    """Forget / kept accuracy before and after, grouped as on validation, and the retain drop as the budget bounds it
    (for a domain edit the larger drop of its two kept groups, ``hf_clip_forget.calibration.data.kept_groups``)."""
    request = CalibrationRequest(report.classes, report.retain_classes, report.domains, report.retain_domains,
                                 report.paradigm)  # fmt: skip
    validation = read_validation_data(data)
    forget, kept = groups(request, validation)
    drops = {name: masked_accuracy(before, mask) - masked_accuracy(after, mask)
             for name, mask in kept_groups(request, validation).items()}  # fmt: skip
    numbers = {
        "forget_images": int(forget.sum()), "kept_images": int(kept.sum()),
        "forget_before": masked_accuracy(before, forget), "forget_after": masked_accuracy(after, forget),
        "kept_before": masked_accuracy(before, kept), "kept_after": masked_accuracy(after, kept),
        "retain_drop": max(drops.values()), "group_drops": drops,
    }  # fmt: skip
    numbers["budget_met"] = numbers["forget_after"] <= report.budget.max_forget + 1e-9 and (
        numbers["retain_drop"] <= report.budget.max_retain_drop + 1e-9
    )
    return numbers


def test_numbers(edited, tokenizer, test, report) -> dict:
    """:func:`scores` of the adapter as written on the test split, with the harness's per-(domain, class) cells."""
    after = predictions(edited, tokenizer, test)
    with edited.base_model.edits_bypassed():
        before = predictions(edited, tokenizer, test)
    numbers = scores(before == test.labels, after == test.labels, report, test)
    harness = {when: score_predictions(p, test, list(report.classes)) for when, p in (("before", before),
                                                                                       ("after", after))}  # fmt: skip
    if report.paradigm == "global":  # the harness's own retain accuracy is the kept accuracy here: check it
        assert abs(harness["after"].retain_accuracy - numbers["kept_after"]) < 1e-9
    numbers["per_cell"] = {
        cell: [harness["before"].per_domain_class[cell], harness["after"].per_domain_class[cell]]
        for cell in (harness["after"].per_domain_class or {})
    }
    return numbers


def test_curve(edited, tokenizer, test, report) -> list[dict]:
    """Every candidate strength's numbers on the test split (the class embeddings computed once when the edit is
    image-side, as the calibration does)."""
    with edited.base_model.edits_bypassed():
        before = predictions(edited, tokenizer, test) == test.labels
    edits_text = any(not layer.image_side and report.adapter in layer.projection_edit_settings
                     for layer in edited.base_model.forget_layers().values())  # fmt: skip
    text = class_embeddings(edited, tokenizer, list(test.class_names), show_progress=False)
    curve = []
    for candidate in report.candidates:
        set_strength(edited, report.adapter, candidate.strength, calibration={})  # a candidate, not the choice
        after = predictions(edited, tokenizer, test, None if edits_text else text) == test.labels
        curve.append({"strength": dict(candidate.strength),
                      **{k: v for k, v in scores(before, after, report, test).items() if k != "group_drops"}})  # fmt: skip
    return curve


def run_task(model, tokenizer, train, test, dataset: str, task: dict, protocol: str) -> dict:
    options = {key: task[key] for key in ("domains", "retain_domains", "paradigm") if key in task}
    started = time.perf_counter()
    edited, report = calibrate_forget_adapter(
        model, task["classes"], tokenizer, data=train, budget=task["budget"], method=task["method"],
        show_progress=False, **options,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    try:
        templates = list(edited.peft_config[report.adapter].templates)
        test_result = test_numbers(edited, tokenizer, test, report)
        # from here on the adapter holds other strengths than the chosen one
        curve = [
            {**c.to_dict(report.budget), "test": t}
            for c, t in zip(report.candidates, test_curve(edited, tokenizer, test, report), strict=True)
        ]
        same = next(c["test"] for c in curve if c["strength"] == dict(report.chosen.strength))
        assert abs(same["forget_after"] - test_result["forget_after"]) < 1e-9  # the curve measures what was written
    finally:
        edited.unload()  # the plain model again for the next task
    validation = {
        "images": report.validation.num_images, "forget_images": report.validation.forget_images,
        "kept_images": report.validation.kept_images,
        "forget_before": report.forget_accuracy.before, "forget_after": report.forget_accuracy.after,
        "kept_before": report.kept_accuracy.before, "kept_after": report.kept_accuracy.after,
        "retain_drop": report.retain_drop, "drop_group": report.chosen.drop_group, "budget_met": report.budget_met,
    }  # fmt: skip
    return {
        "protocol": protocol, "dataset": dataset, "kind": task["kind"], "classes": list(report.classes),
        "domains": list(report.domains), "retain_domains": list(report.retain_domains), "method": report.method,
        "budget": report.budget.to_dict(),
        "chosen": dict(report.chosen.strength), "choice": report.choice, "candidates": len(report.candidates),
        "validation": validation, "test": test_result,
        "gap": {"forget_after": test_result["forget_after"] - validation["forget_after"],
                "retain_drop": test_result["retain_drop"] - validation["retain_drop"]},
        "templates": templates, "classifier": report.classifier,
        "calibration_seconds": report.seconds, "task_seconds": seconds, "curve": curve,
    }  # fmt: skip


def label(row: dict) -> str:
    where = f" / {row['domains'][0]}" if row["domains"] else ""
    return f"{row['dataset']}: {', '.join(row['classes'])}{where}"


def print_rows(rows: list[dict], header: bool = True) -> None:
    def pct(before: float, after: float) -> str:
        return f"{100 * before:5.1f} → {100 * after:5.1f}"

    if header:
        print(f"\n{'task':<44} {'method':<9} {'strength':<26} {'val forget':>14} {'val kept':>14} {'met':>4} "
              f"{'test forget':>14} {'test kept':>14} {'met':>4} {'gap F/D':>12} {'s':>5}")  # fmt: skip
    for r in rows:
        v, t = r["validation"], r["test"]
        gap = f"{100 * r['gap']['forget_after']:+5.1f}/{100 * r['gap']['retain_drop']:+5.1f}"
        print(f"{label(r)[:44]:<44} {r['method']:<9} {format_strength(r['chosen'])[:26]:<26} "
              f"{pct(v['forget_before'], v['forget_after']):>14} {pct(v['kept_before'], v['kept_after']):>14} "
              f"{'yes' if v['budget_met'] else 'NO':>4} {pct(t['forget_before'], t['forget_after']):>14} "
              f"{pct(t['kept_before'], t['kept_after']):>14} {'yes' if t['budget_met'] else 'NO':>4} {gap:>12} "
              f"{r['calibration_seconds']:5.1f}")  # fmt: skip


def print_summary(rows: list[dict]) -> None:
    """Per protocol and kind: how many tasks meet the budget on validation and, of these, on test."""
    for protocol in ("train-sample", "test-halves"):
        for kind in ("global", "domain"):
            chosen = [r for r in rows if (r["protocol"], r["kind"]) == (protocol, kind)]
            if not chosen:
                continue
            met = [r for r in chosen if r["validation"]["budget_met"]]
            test_met = sum(r["test"]["budget_met"] for r in met)
            gaps = [100 * r["gap"]["forget_after"] for r in chosen]
            print(f"{protocol:<13} {kind:<7} tasks {len(chosen):>2}, budget met on validation {len(met):>2}; of these "
                  f"met on test: {test_met}; forget gap (test − val): mean {sum(gaps) / len(gaps):+.1f}, "
                  f"max {max(gaps):+.1f}")  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    """Left, middle: validation against test per task (forget accuracy after the edit, retain drop), with the budgets;
    filled markers: validation on a train sample, hollow: the test-halves control. Right: the whole trade-off of
    dog / sketch on validation and on test (train-sample protocol), the chosen strength circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    styles = {("global", "nullspace"): ("o", "tab:blue"), ("global", "ccup"): ("s", "tab:orange"),
              ("domain", "ccup"): ("^", "tab:red")}  # fmt: skip
    panels = (("forget_after", "forget accuracy after the edit (%)", "max_forget"),
              ("retain_drop", "kept accuracy drop (points)", "max_retain_drop"))  # fmt: skip
    for axis, (field, title, budget_key) in zip(axes, panels, strict=False):
        values = []
        for (kind, method), (marker, color) in styles.items():
            for protocol, fill in (("train-sample", color), ("test-halves", "none")):
                chosen = [r for r in rows if (r["kind"], r["method"], r["protocol"]) == (kind, method, protocol)]
                if not chosen:
                    continue
                x = [100 * r["validation"][field] for r in chosen]
                y = [100 * r["test"][field] for r in chosen]
                values += x + y
                axis.scatter(x, y, marker=marker, facecolors=fill, edgecolors=color, alpha=0.8,
                             label=f"{kind}, {method} ({protocol})")  # fmt: skip
        low, high = min(values + [0]) - 2, max(values + [1]) + 2
        axis.plot([low, high], [low, high], color="grey", lw=0.8, ls=":")
        for budget, style in ((GLOBAL_BUDGET, "--"), (DOMAIN_BUDGET, "-.")):
            axis.axhline(100 * budget.to_dict()[budget_key], color="grey", lw=0.8, ls=style)
            axis.axvline(100 * budget.to_dict()[budget_key], color="grey", lw=0.8, ls=style)
        axis.set_xlabel(f"validation: {title}")
        axis.set_ylabel(f"test (unseen): {title}")
    axes[0].legend(fontsize=7)
    axes[0].set_title("chosen strength: validation vs test (budgets: global --, domain -.)", fontsize=9)
    task = next((r for r in rows if r["protocol"] == "train-sample" and r["domains"] == ["sketch"]), None)
    if task is not None:
        for split, color in (("validation", "tab:green"), ("test", "tab:purple")):
            points = [
                {"forget_after": c["forget_accuracy"], "retain_drop": c["retain_drop"]} if split == "validation"
                else c["test"] for c in task["curve"]
            ]  # fmt: skip
            axes[2].plot([100 * p["retain_drop"] for p in points], [100 * p["forget_after"] for p in points], ".-",
                         color=color, label=f"{split}: each μ tried")  # fmt: skip
            chosen = next(p for c, p in zip(task["curve"], points, strict=True) if c["strength"] == task["chosen"])
            axes[2].scatter([100 * chosen["retain_drop"]], [100 * chosen["forget_after"]], s=120, facecolors="none",
                            edgecolors=color, label=f"{split}: chosen")  # fmt: skip
        axes[2].axhline(100 * DOMAIN_BUDGET.max_forget, color="grey", lw=0.8, ls="-.")
        axes[2].axvline(100 * DOMAIN_BUDGET.max_retain_drop, color="grey", lw=0.8, ls="-.")
        axes[2].set_xlabel("kept accuracy drop (points)")
        axes[2].set_ylabel("sketch/dog accuracy after the edit (%)")
        axes[2].set_title("dog / sketch, CCUP: the trade-off on validation and on test", fontsize=9)
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rounded(value):
    """``value`` with every float rounded to 6 decimals (the JSON stays readable and small)."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--draws", type=int, default=2, help="forget sets of 1 and of 3 classes per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--protocol",
        choices=["train-sample", "test-halves"],
        default="train-sample",
        help="validation = a train sample, report on test; or calibrate / report on test halves",
    )
    parser.add_argument("--sample", type=int, default=1000, help="train images per dataset (the validation data)")
    parser.add_argument("--require-cached", action="store_true", help="stop instead of embedding uncached images")
    parser.add_argument("--json", default=None)
    parser.add_argument("--update", action="store_true", help="keep --json's rows of the datasets not run now")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model, tokenizer, processor = load_dual_encoder(args.model)
    names = args.datasets.split(",")
    splits = {}
    for name in names:  # every split's features first: --require-cached refuses before any calibration
        if args.protocol == "test-halves":
            test = split_features(model, processor, args.data_dir, name, "test", 0, 0, args.require_cached)
            splits[name] = halves(test)
        else:
            splits[name] = [split_features(model, processor, args.data_dir, name, split, args.sample, args.seed,
                                           args.require_cached) for split in ("train", "test")]  # fmt: skip
    rows = []
    for name in names:
        train, test = splits[name]
        print(f"{name}: {len(train)} validation images ({args.protocol}), {len(test)} test images")
        for task in tasks(list(train.class_names), name, args.draws, args.seed):
            rows.append(run_task(model, tokenizer, train, test, name, task, args.protocol))
            print_rows(rows[-1:], header=len(rows) == 1)
    kept = []
    if args.update and args.json and os.path.isfile(args.json):
        with open(args.json) as handle:
            kept = [
                row
                for row in json.load(handle)["rows"]
                if (row["dataset"], row["protocol"]) not in {(name, args.protocol) for name in names}
            ]
    rows = kept + rows
    for protocol in ("train-sample", "test-halves"):
        chosen = [row for row in rows if row["protocol"] == protocol]
        if chosen:
            print(f"\nprotocol {protocol}:")
            print_rows(chosen)
    print()
    print_summary(rows)
    if args.json:
        settings = {"model": args.model, "draws": args.draws, "seed": args.seed, "sample": args.sample,
                    "torch_threads": torch.get_num_threads()}  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(rounded({"settings": settings, "rows": rows}), handle, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
