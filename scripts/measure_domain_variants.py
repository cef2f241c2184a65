"""Closed-form variants of domain-specific forgetting on PACS, each against the seed paper's goal (issue 22).

The four tasks of ``scripts/measure_domains.py`` (dog/sketch, person/art_painting, guitar/cartoon, horse/photo),
the demo model, every PACS class a zero-shot candidate (80 ImageNet templates averaged: the classifier does not know
the domain). The goal per task: forgotten cell ≤ 5 %, the same class in the kept domains within −5 points, the
other classes (in the forgotten domain and in the kept ones) within −3 points.

Variants, each a family of settings; **train chooses** one setting per variant (the most tasks at the goal, then the
lowest mean forgotten cell), **test reports** it:

* ``ccup``: the library's domain edit (``add_forget_adapter(..., domains=[d], retain_domains=<the others>,
  retain_classes=<the other 6>, ccup_mu=μ)``), one key per (class, domain) cell (its templates averaged);
* ``ccup_phrasings``: the same with one key per prompt (``average_templates=False``): several phrasings per cell;
* ``logit``: ``add_forget_adapter(..., method="logit", logit_mu=μ, logit_margin=margin)``
  (:mod:`hf_clip_forget.core.logit_edit`) — only the forgotten class's logit moves, along what separates its forget
  prompts from the kept domains' cells (every named class in the kept domains and the plain class prompts, weight
  μ), until it sits ``margin`` below the best other class on the forget prompts.

Every edit is built through the public API, as a user builds it.

    python scripts/measure_domain_variants.py --data-dir ../shared/data --json docs/domains_variants.json \\
        --plot docs/domains_variants.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.evaluation import class_embeddings, project_image_features, score_predictions, zero_shot_logits


TASKS = (("dog", "sketch"), ("person", "art_painting"), ("guitar", "cartoon"), ("horse", "photo"))
CCUP_MUS = (1000.0, 300.0, 100.0, 50.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)
LOGIT_MUS = (1.0, 10.0, 100.0)
LOGIT_MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3)
GOAL = {"forgotten": 5.0, "same_class": -5.0, "other_classes": -3.0}


class Split:
    """One PACS split's image embeddings, the classifier, and the per-cell accuracy before any edit."""

    def __init__(self, model, image_processor, data_dir: str, split: str) -> None:
        path = os.path.join(data_dir, "pacs", f"{split}.parquet")
        self.features = cached_image_features(model, image_processor, path, split, "demo")
        self.images = project_image_features(model, self.features).double()

    def judge_with(self, classifier: torch.Tensor) -> None:
        self.classifier = classifier
        self.before = self.cells(self.images)

    def cells(self, images: torch.Tensor) -> dict[str, float]:
        logits = zero_shot_logits(images.float(), self.classifier)
        return {k: 100 * v for k, v in score_predictions(logits.argmax(-1), self.features).per_domain_class.items()}


def task_groups(before: dict, after: dict, name: str, domain: str, domains, classes) -> dict:
    """Before/after mean accuracy (%) of the forgotten cell and the three kept groups, and whether the goal is met."""
    kept = [d for d in domains if d != domain]
    others = [c for c in classes if c != name]
    keys = {
        "forgotten": [f"{domain}/{name}"],
        "same_class": [f"{d}/{name}" for d in kept],
        "other_classes_forgotten_domain": [f"{domain}/{c}" for c in others],
        "other_classes_kept_domains": [f"{d}/{c}" for d in kept for c in others],
    }
    result = {group: [statistics.mean(before[k] for k in cells), statistics.mean(after[k] for k in cells)]
              for group, cells in keys.items()}  # fmt: skip
    change = {group: after_ - before_ for group, (before_, after_) in result.items()}
    result["goal_met"] = (
        result["forgotten"][1] <= GOAL["forgotten"]
        and change["same_class"] >= GOAL["same_class"]
        and min(change["other_classes_forgotten_domain"], change["other_classes_kept_domains"])
        >= GOAL["other_classes"]
    )
    return result


def library_edits(model, tokenizer, name, domain, domains, classes, settings):
    """The library's domain edit at every setting of ``settings``: ``(setting, edited images function)``."""
    for setting in settings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edited = add_forget_adapter(
                model, [name], tokenizer, retain_classes=[c for c in classes if c != name], domains=[domain],
                retain_domains=[d for d in domains if d != domain], adapter_name="variant", show_progress=False,
                **setting,
            )  # fmt: skip
        try:
            shown = {k.removeprefix("ccup_").removeprefix("logit_"): v for k, v in setting.items() if k != "method"}
            shown.pop("average_templates", None)
            yield shown, lambda split, edited=edited: project_image_features(edited, split.features).double()
        finally:
            edited.unload()


VARIANTS = {
    "ccup": [{"method": "ccup", "ccup_mu": mu} for mu in CCUP_MUS],
    "ccup_phrasings": [{"method": "ccup", "ccup_mu": mu, "average_templates": False} for mu in CCUP_MUS],
    "logit": [{"method": "logit", "logit_mu": mu, "logit_margin": m} for mu in LOGIT_MUS for m in LOGIT_MARGINS],
}


def measure(args) -> dict:
    model, tokenizer, image_processor = load_dual_encoder("demo")
    splits = {s: Split(model, image_processor, args.data_dir, s) for s in ("train", "test")}
    classes, domains = list(splits["test"].features.class_names), list(splits["test"].features.domain_names)
    evaluation = class_embeddings(model, tokenizer, classes, show_progress=False)
    for split in splits.values():
        split.judge_with(evaluation)
    rows = []
    for name, domain in TASKS:
        for variant, settings in VARIANTS.items():
            for setting, images_of in library_edits(model, tokenizer, name, domain, domains, classes, settings):
                row = {"variant": variant, "task": f"{name}/{domain}", **setting}
                for split_name, split in splits.items():
                    after = split.cells(images_of(split))
                    row[split_name] = task_groups(split.before, after, name, domain, domains, classes)
                rows.append(row)
                print(describe(row))
    return {"rows": rows, "chosen": choose(rows), "goal": GOAL}


def describe(row: dict) -> str:
    setting = " ".join(f"{k}={row[k]:g}" for k in ("mu", "margin") if k in row)
    parts = []
    for split in ("train", "test"):
        g = row[split]
        parts.append(f"{split} {g['forgotten'][0]:.1f}→{g['forgotten'][1]:.1f} "
                     f"same {g['same_class'][1] - g['same_class'][0]:+.1f} "
                     f"others {g['other_classes_forgotten_domain'][1] - g['other_classes_forgotten_domain'][0]:+.1f}/"
                     f"{g['other_classes_kept_domains'][1] - g['other_classes_kept_domains'][0]:+.1f}"
                     f"{' GOAL' if g['goal_met'] else ''}")  # fmt: skip
    return f"{row['variant']:<15} {row['task']:<20} {setting:<18} " + " | ".join(parts)


def choose(rows: list[dict]) -> dict:
    """Per variant, the setting chosen on train (most tasks at the goal, then the lowest mean forgotten cell) and its
    train and test results per task."""
    chosen = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        settings = {}
        for row in (r for r in rows if r["variant"] == variant):
            settings.setdefault(tuple((k, row[k]) for k in ("mu", "margin") if k in row), []).append(row)

        def score(items):
            met = sum(r["train"]["goal_met"] for r in items[1])
            return (-met, statistics.mean(r["train"]["forgotten"][1] for r in items[1]))

        setting, picked = min(settings.items(), key=score)
        chosen[variant] = {
            "setting": dict(setting),
            "train_tasks_met": sum(r["train"]["goal_met"] for r in picked),
            "test_tasks_met": sum(r["test"]["goal_met"] for r in picked),
            "tasks": {r["task"]: {"train": r["train"], "test": r["test"]} for r in picked},
        }
    return chosen


def plot(results: dict, path: str) -> None:
    """Per task and variant (test split): the forgotten cell against the same class in the kept domains, one point per
    setting; the setting chosen on train circled; the goal region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ccup": "tab:blue", "ccup_phrasings": "tab:green", "logit": "tab:red"}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.4 * len(TASKS), 3.6), squeeze=False)
    for axis, (name, domain) in zip(axes[0], TASKS, strict=True):
        task = f"{name}/{domain}"
        for variant, colour in colours.items():
            points = [r for r in results["rows"] if r["variant"] == variant and r["task"] == task]
            xs = [r["test"]["forgotten"][1] for r in points]
            ys = [r["test"]["same_class"][1] for r in points]
            axis.plot(xs, ys, ".", color=colour, label=variant, ms=5)
            chosen = results["chosen"][variant]["tasks"][task]["test"]
            axis.plot([chosen["forgotten"][1]], [chosen["same_class"][1]], "o", mfc="none", mec=colour, ms=11)
        before = points[0]["test"]
        axis.plot([before["forgotten"][0]], [before["same_class"][0]], "k*", ms=9)
        axis.axvspan(-3, GOAL["forgotten"], ymin=0, ymax=1, color="grey", alpha=0.1)
        axis.axhline(before["same_class"][0] + GOAL["same_class"], color="grey", lw=0.8, ls=":")
        axis.set_title(f"{name} in {domain} (test)", fontsize=9)
        axis.set_xlabel(f"{domain}/{name} accuracy (%)", fontsize=8)
        axis.set_ylabel(f"{name}, kept domains (%)", fontsize=8)
        axis.set_xlim(-3, 102), axis.set_ylim(-3, 102)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Domain-specific forgetting, closed-form variants (demo model, PACS test). ★ before; circled: the "
        "setting chosen on train; goal: left of the band's edge and above the dotted line",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--json", required=True, help="write every setting's results and the chosen ones here")
    parser.add_argument("--plot", default=None, help="write the trade-off plot (PNG) here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = measure(args)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    for variant, summary in results["chosen"].items():
        print(f"{variant}: {summary['setting']} — goal met on {summary['train_tasks_met']}/4 train, "
              f"{summary['test_tasks_met']}/4 test")  # fmt: skip
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
