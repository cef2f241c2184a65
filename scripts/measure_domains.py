"""Measure domain-aware forgetting on PACS, the data-free effect estimate against real images, and the default μ.

The demo model, every PACS class a zero-shot candidate (80 ImageNet templates averaged, domain-agnostic — the
classifier does not know the domain). Every edit is built through the public API (``add_forget_adapter`` with
``domains`` / ``retain_domains`` / ``paradigm`` / ``prototypes``). Reported per edit: the accuracy of the forgotten
(domain, class) cells, of the same class in the kept domains, of the other classes in the forgotten domain, and of
all other cells, before → after, and the data-free estimate the build recorded (``provenance["effect_estimate"]``).

Three runs, each writing its own key of ``--json`` (other keys are kept):

    # the μ sweep (text directions only; with and without naming the other classes) on one split
    python scripts/measure_domains.py --sweep --split train --json docs/domains.json
    python scripts/measure_domains.py --sweep --split test --prototype-mus 100,10 --json docs/domains.json
    # the default μ, chosen on the train sweep (rule: choose_default_mu), and the trade-off plot
    python scripts/measure_domains.py --choose-mu --json docs/domains.json --plot docs/domain_tradeoffs.png
    # the data-free estimate of global text-side edits (docs/audit.md has their real effect)
    python scripts/measure_domains.py --global-estimates --json docs/domains.json
    # the earlier study: global / domain / complete, text-only vs text + prototypes (issue 5), test split, with the
    # plain templates of its time (80)
    python scripts/measure_domains.py --study --templates imagenet --json docs/domains.json

Goals: global "dog": ≤ 5 % in every domain, other classes within 2 points (issue 5); domain-specific (the seed paper's,
issue 22): forgotten cell ≤ 5 %, the same class in the kept domains within −5 points, the other classes within −3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
import warnings

import torch

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.evaluation import class_embeddings, project_image_features, score_predictions, zero_shot_logits


GLOBAL_TASKS = (("dog",), ("person",), ("guitar",))
DOMAIN_TASKS = (("dog", "sketch"), ("person", "art_painting"), ("guitar", "cartoon"), ("horse", "photo"))
COMPLETE_TASKS = (("dog", "sketch"), ("person", "art_painting"))
SWEEP_MUS = "1000,300,100,50,30,10,3,1,0.3,0.1"
#: The seed paper's goal for a domain-specific edit (fractions): forgotten cells at most, changes at least.
GOAL = {"forgotten": 0.05, "same_class": -0.05, "others": -0.03}


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


class Bench:
    """The demo model, one PACS split's cached image features, and the unedited per-cell accuracies."""

    def __init__(self, data_dir: str, split: str, model_name: str = "demo", templates: str | None = None) -> None:
        self.templates = templates
        self.model, self.tokenizer, self.image_processor = load_dual_encoder(model_name)
        path = os.path.join(data_dir, "pacs", f"{split}.parquet")
        self.features = cached_image_features(self.model, self.image_processor, path, split, model_name)
        self.classes, self.domains = list(self.features.class_names), list(self.features.domain_names)
        self.text = class_embeddings(self.model, self.tokenizer, self.classes)
        self.before = cell_accuracies(self.model, self.features, self.text)

    def run(self, paradigm, forget_class, forget_domains, *, name_others=True, prototypes=0, steps=60, **options):
        """Build one edit, measure it, unload it; the row for the JSON."""
        kept = [d for d in self.domains if d not in forget_domains]
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            edited = add_forget_adapter(
                self.model, [forget_class], self.tokenizer,
                retain_classes=[c for c in self.classes if c != forget_class] if name_others else None,
                domains=list(forget_domains) if paradigm != "global" else self.domains,
                retain_domains=kept if paradigm != "global" else None, paradigm=paradigm, prototypes=prototypes,
                prototype_options={"steps": steps}, image_processor=self.image_processor, adapter_name="measured",
                show_progress=False, templates=self.templates, **options,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        config = edited.peft_config["measured"]
        after = cell_accuracies(edited, self.features, self.text)
        edited.unload()
        summary = groups(self.before, after, forget_class, forget_domains or self.domains, self.domains, self.classes)
        if paradigm == "global":  # every domain is forgotten: report each one
            summary.update({f"{d}/{forget_class}": (self.before[f"{d}/{forget_class}"], after[f"{d}/{forget_class}"])
                            for d in self.domains})  # fmt: skip
        return {
            "paradigm": paradigm, "class": forget_class, "domains": list(forget_domains) or self.domains,
            "method": config.method, "ccup_mu": config.ccup_mu if config.method == "ccup" else None,
            "prototypes": prototypes, "retain_classes_named": name_others, "edit_seconds": seconds,
            "groups": summary, "estimate": config.provenance.get("effect_estimate"),
            "weak_edit_warning": any(type(w.message).__name__ == "WeakEditWarning" for w in caught),
        }  # fmt: skip


def describe(row: dict) -> None:
    source = f"text + {row['prototypes']} prototypes/cell" if row["prototypes"] else "text only"
    others = "" if row["retain_classes_named"] else ", other classes NOT named"
    mu = "" if row["ccup_mu"] is None else f" μ={row['ccup_mu']:g}"
    print(f"\n{row['paradigm']:<8} {row['class']}/{'+'.join(row['domains'])} — {row['method']}{mu}, {source}{others} "
          f"({row['edit_seconds']:.0f} s)", flush=True)  # fmt: skip
    for name, (b, a) in row["groups"].items():
        print(f"  {name:<34} {100 * b:5.1f} → {100 * a:5.1f} %  ({100 * (a - b):+.1f})", flush=True)
    estimate = row["estimate"]
    if estimate:
        print(f"  estimate: forgotten probes keep {estimate['predicted_kept']}, weak={estimate['weak']}, "
              f"warned={row['weak_edit_warning']}", flush=True)  # fmt: skip


def sweep(bench: Bench, mus: list[float], prototype_mus: list[float], prototypes: int, steps: int) -> list[dict]:
    """Domain-specific edits for every μ: naming the other classes (as the API docs do) or not (as the issue's CLI
    command did), text only; with prototypes for ``prototype_mus``."""
    rows = []
    for forget_class, domain in DOMAIN_TASKS:
        for mu in mus:
            for name_others in (True, False):
                rows.append(bench.run("domain", forget_class, (domain,), name_others=name_others, method="ccup",
                                      ccup_mu=mu))  # fmt: skip
                describe(rows[-1])
        for mu in prototype_mus:
            rows.append(bench.run("domain", forget_class, (domain,), method="ccup", ccup_mu=mu, prototypes=prototypes,
                                  steps=steps))  # fmt: skip
            describe(rows[-1])
    return rows


def study(bench: Bench, mus: list[float], prototypes: int, steps: int) -> list[dict]:
    """The issue-5 study: global, domain-specific and complete, text-only vs text + prototypes."""
    tasks = [("global", c, ()) for (c,) in GLOBAL_TASKS]
    tasks += [("domain", c, (d,)) for c, d in DOMAIN_TASKS] + [("complete", c, (d,)) for c, d in COMPLETE_TASKS]
    rows = []
    for paradigm, forget_class, forget_domains in tasks:
        settings = [("nullspace", None), ("ccup", 100.0)] if paradigm == "global" else [("ccup", mu) for mu in mus]
        for method, mu in settings:
            for count in (0, prototypes):
                options = {"method": method} | ({"ccup_mu": mu} if mu is not None else {})
                rows.append(
                    bench.run(paradigm, forget_class, forget_domains, prototypes=count, steps=steps, **options)
                )
                describe(rows[-1])
    return rows


#: Global edits whose estimate is checked against the audit's real numbers (docs/audit.md, same forget sets).
GLOBAL_ESTIMATES = {
    "cifar10": (["frog"], ["frog", "airplane", "deer"]),
    "pacs": (["person"], ["guitar", "person", "dog"]),
    "caltech101": (["hedgehog"], ["wild_cat", "joshua_tree", "airplanes"]),
}


def global_estimates(data_dir: str, model_name: str) -> list[dict]:
    """The data-free estimate of global text-side edits naming every other class of the data (no images are read:
    only the class names). Global image-side edits are not estimated: they remove the forgotten prompts' span from
    every image (since issue 13 a build skips their estimate)."""
    import datasets

    model, tokenizer, _ = load_dual_encoder(model_name)
    rows = []
    for name, forget_sets in GLOBAL_ESTIMATES.items():
        path = os.path.join(data_dir, name, "test.parquet")
        names = datasets.load_dataset("parquet", data_files={"test": path}, split="test").features["label"].names
        for forget, target in [(forget, "text") for forget in forget_sets]:
            others = [c for c in names if c not in forget]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                edited = add_forget_adapter(model, forget, tokenizer, retain_classes=others, target=target,
                                            adapter_name="measured", show_progress=False)  # fmt: skip
            estimate = edited.peft_config["measured"].provenance["effect_estimate"]
            edited.unload()
            warned = any(type(w.message).__name__ == "WeakEditWarning" for w in caught)
            rows.append({"dataset": name, "forget": forget, "target": target, "retain_classes": len(others),
                         "estimate": estimate, "weak_edit_warning": warned})  # fmt: skip
            print(f"{name:<10} {'+'.join(forget):<30} {target:<6} predicted margin kept "
                  f"{estimate['predicted_kept']:+.2f} weak={estimate['weak']} warned={warned}", flush=True)  # fmt: skip
    return rows


def meets_goal(groups: dict) -> bool:
    """The seed paper's goal for a domain-specific edit: forgotten cells ≤ 5 %, the same class in the kept domains
    within −5 points, the other classes (in the forgotten and in the kept domains) within −3 points."""
    change = {name: after - before for name, (before, after) in groups.items()}
    return (
        groups["forgotten cells"][1] <= GOAL["forgotten"]
        and change["same class, kept domains"] >= GOAL["same_class"]
        and min(change["other classes, forgotten domains"], change["other classes, kept domains"]) >= GOAL["others"]
    )


def choose_default_mu(rows: list[dict]) -> tuple[float, list[dict]]:
    """The default μ of ``paradigm="domain"``, from the train sweep (text only, other classes named): the μ with the
    most of the four tasks at the goal (:func:`meets_goal`), then the lowest mean forgotten cell. Returns it and the
    per-μ summary."""
    table = []
    for mu in sorted({r["ccup_mu"] for r in rows}, reverse=True):
        points = [r for r in rows if r["ccup_mu"] == mu and r["retain_classes_named"] and not r["prototypes"]]
        kept = [r["groups"]["same class, kept domains"] for r in points]
        table.append({
            "ccup_mu": mu, "tasks_at_goal": sum(meets_goal(r["groups"]) for r in points),
            "forgotten_after": statistics.mean(r["groups"]["forgotten cells"][1] for r in points),
            "forgotten_drop": statistics.mean(r["groups"]["forgotten cells"][0] - r["groups"]["forgotten cells"][1]
                                              for r in points),
            "kept_drop": statistics.mean(b - a for b, a in kept),
        })  # fmt: skip
    best = min(table, key=lambda row: (-row["tasks_at_goal"], row["forgotten_after"]))
    return best["ccup_mu"], table


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def estimate_agreement(rows: list[dict]) -> dict:
    """How well the data-free estimate orders the real effects: Spearman correlation, over every edit, of the
    forgotten probes' margin kept with the forgotten cells' accuracy kept (after / before), and of the kept
    probes' accuracy change with the same class's real change in the kept domains."""
    usable = [r for r in rows if r["estimate"] and r["estimate"]["forgotten"]["margin_kept"] is not None]
    real_kept = [r["groups"]["forgotten cells"][1] / r["groups"]["forgotten cells"][0] for r in usable]
    predicted = [r["estimate"]["forgotten"]["margin_kept"] for r in usable]
    same = [r for r in usable if r["estimate"]["same_class_kept"]]
    real_same = [r["groups"]["same class, kept domains"][1] - r["groups"]["same class, kept domains"][0] for r in same]
    predicted_same = [r["estimate"]["same_class_kept"]["margin_kept"] for r in same]
    flagged = [r for r in rows if r["estimate"] and r["estimate"]["weak"]]
    return {
        "edits": len(usable),
        "spearman_forgotten": spearman(predicted, real_kept),
        "spearman_same_class_kept": spearman(predicted_same, real_same),
        "flagged": len(flagged),
        "largest_real_drop_when_flagged": max(
            (r["groups"]["forgotten cells"][0] - r["groups"]["forgotten cells"][1] for r in flagged), default=None
        ),
    }


def weak_thresholds(rows: list[dict], moved: float = 0.05) -> list[dict]:
    """For candidate thresholds of the margin kept (domain-specific edits naming the other classes): how many are
    flagged, the largest real drop of the forgotten cells among them, and the errors — flagged edits that moved
    their cells by ≥ ``moved``, unflagged ones that did not. The threshold chosen (``WEAK_MARGIN_KEPT``) is the one
    with the fewest errors on train, the higher one on a tie (fewer warnings on edits that act)."""
    usable = [r for r in rows if r["retain_classes_named"] and not r["prototypes"]]
    table = []
    for threshold in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
        drops = [(r["estimate"]["predicted_kept"] >= threshold,
                  r["groups"]["forgotten cells"][0] - r["groups"]["forgotten cells"][1]) for r in usable]  # fmt: skip
        flagged = [d for weak, d in drops if weak]
        table.append({"threshold": threshold, "flagged": len(flagged), "largest_real_drop": max(flagged, default=None),
                      "flagged_that_moved": sum(d >= moved for d in flagged),
                      "unflagged_that_did_not": sum(d < moved for weak, d in drops if not weak)})  # fmt: skip
    return table


def plot_tradeoffs(sweeps: dict, default_mu: float, path: str) -> None:
    """Per task: the forgotten cell against the same class in the kept domains, one point per μ (train and test,
    text only; test with prototypes), the default μ circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAIN_TASKS), figsize=(3.3 * len(DOMAIN_TASKS), 3.5), squeeze=False)
    styles = {("train", 0): ("o--", "tab:grey"), ("test", 0): ("o-", "tab:blue"), ("test", 1): ("s-", "tab:orange")}
    for axis, (name, domain) in zip(axes[0], DOMAIN_TASKS, strict=True):
        for (split, with_prototypes), (style, colour) in styles.items():
            points = [r for r in sweeps.get(split, []) if r["class"] == name and r["retain_classes_named"]
                      and bool(r["prototypes"]) == bool(with_prototypes)]  # fmt: skip
            if not points:
                continue
            points.sort(key=lambda r: -r["ccup_mu"])
            xs = [100 * r["groups"]["forgotten cells"][1] for r in points]
            ys = [100 * r["groups"]["same class, kept domains"][1] for r in points]
            label = f"{split}, " + (f"+ {points[0]['prototypes']} prototypes" if with_prototypes else "text only")
            axis.plot(xs, ys, style, color=colour, label=label, ms=4)
            for r, x, y in zip(points, xs, ys, strict=True):
                if split == "test" and r["ccup_mu"] in (1000, 100, 50, 10, 3, 1):
                    axis.annotate(f"{r['ccup_mu']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                if r["ccup_mu"] == default_mu and not with_prototypes:
                    axis.plot([x], [y], "o", mfc="none", mec="red", ms=10)
            before = points[0]["groups"]
            axis.plot([100 * before["forgotten cells"][0]], [100 * before["same class, kept domains"][0]], "k*")
        axis.axvline(5, color="grey", lw=0.8, ls=":")
        axis.set_title(f"{name} in {domain}", fontsize=9)
        axis.set_xlabel(f"{domain}/{name} accuracy (%)", fontsize=8)
        axis.set_ylabel(f"{name}, other domains (%)", fontsize=8)
        axis.set_xlim(-3, 100), axis.set_ylim(-3, 100)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Domain-specific forgetting on PACS (demo model), one point per μ (numbers: μ; red: default "
                 f"μ = {default_mu:g}; ★ before). Ideal: left and high.", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact_json(results: dict) -> str:
    """Indented JSON with every innermost list and every probe-group dict on one line."""
    text = json.dumps(results, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return re.sub(r"\{\s+([^\[\]{}]*?)\s+\}", lambda m: "{" + " ".join(m.group(1).split()) + "}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--sweep", action="store_true", help="domain-specific edits for every --mus (text only)")
    run.add_argument("--study", action="store_true", help="the issue-5 study (global/domain/complete, prototypes)")
    run.add_argument("--choose-mu", action="store_true", help="choose the default μ from the saved train sweep")
    run.add_argument("--global-estimates", action="store_true", help="data-free estimate of global edits (no images)")
    parser.add_argument("--mus", default=None, help=f"CCUP retain weights μ (λ = 1000); sweep default {SWEEP_MUS}")
    parser.add_argument("--prototype-mus", default="", help="sweep: also these μ with prototypes")
    parser.add_argument("--prototypes", type=int, default=4, help="prototypes per forget cell in the +prototypes runs")
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps per prototype")
    parser.add_argument("--templates", default=None, help="templates of the edits (default: the library's)")
    parser.add_argument("--json", required=True, help="read and update this JSON (one key per run)")
    parser.add_argument("--plot", default=None, help="--choose-mu: write the trade-off plot (PNG) here")
    args = parser.parse_args()
    results = json.load(open(args.json)) if os.path.isfile(args.json) else {}
    torch.set_grad_enabled(False)
    if args.choose_mu:
        chosen, table = choose_default_mu(results["sweeps"]["train"])
        results["default_mu"] = {"chosen": chosen, "rule": choose_default_mu.__doc__.split("\n\n")[0],
                                 "goal": GOAL, "train": table}  # fmt: skip
        results["estimate_agreement"] = {split: estimate_agreement(rows) for split, rows in results["sweeps"].items()}
        results["weak_thresholds"] = {split: weak_thresholds(rows) for split, rows in results["sweeps"].items()}
        print(json.dumps({k: results[k] for k in ("default_mu", "estimate_agreement", "weak_thresholds")}, indent=1))
        if args.plot:
            plot_tradeoffs(results["sweeps"], chosen, args.plot)
    elif args.global_estimates:
        results["global_estimates"] = global_estimates(args.data_dir, args.model)
    else:
        bench = Bench(args.data_dir, args.split, args.model, args.templates)
        if args.sweep:
            mus = [float(m) for m in (args.mus or SWEEP_MUS).split(",")]
            prototype_mus = [float(m) for m in args.prototype_mus.split(",") if m]
            rows = sweep(bench, mus, prototype_mus, args.prototypes, args.steps)
            results.setdefault("sweeps", {})[args.split] = rows
            results.setdefault("before", {})[args.split] = bench.before
        else:
            mus = [float(m) for m in (args.mus or "1000,100,10").split(",")]
            results["study"] = {"split": args.split, "before": bench.before,
                                "rows": study(bench, mus, args.prototypes, args.steps)}  # fmt: skip
    with open(args.json, "w") as handle:
        handle.write(compact_json(results))


if __name__ == "__main__":
    main()
