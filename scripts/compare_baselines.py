"""Ours against the peers on the same model, data and tasks, in one run: one table, times as ratios to ours.

Rows, on the demo model, forgetting one class of each test split (CIFAR-10, Caltech-101, PACS; the first forget set
of ``scripts/measure_forgetting.py``) with every class a zero-shot candidate:

- ours: ``nullspace`` (shared direction kept), ``nullspace-plain`` (the forget name alone, no retain names),
  ``ccup``, ``multimodal`` (CCUP + 4 visual prototypes) — names only;
- (a) ``lora-text`` — Kravets & Namboodiri style: a rank-5 peft LoRA on ``text_projection``, 2000 Adam steps; the
  forget loss pulls the class's prompt features to the empty prompt's, the retain loss keeps the 5 most similar
  classes' features where they were. Every step runs the (frozen) text tower, as a straightforward implementation
  does; ``lora-text-cached`` is the same optimisation on cached text-tower outputs (the baseline's best case);
- (b) ``gradient-ascent`` — fine-tunes ``visual_projection`` by gradient ascent on the cross-entropy of *real* forget
  images of the train split (it uses data) until they are no longer recognised (≤ 1 %), at most 200 steps;
- (c) ``leace`` — ``concept_erasure.LeaceEraser`` fitted on image embeddings of real train images labelled
  forget/other, applied to the image embeddings (a data-driven closed form; affine, so it stays a hook).

Columns: forget / retain accuracy, wall time to produce the edit (text encoding, prototype synthesis, optimisation,
feature extraction of the images a method needs — everything), saved artefact size, and whether unmerging or
removing the edit gives back the original weights bit for bit. ``--scale`` adds forgetting 1, 10 and 50 Caltech-101
classes at once and 20 stacked adapters.

    python scripts/compare_baselines.py --data-dir ../shared/data --json docs/baselines.json --scale
    python scripts/compare_baselines.py --quick     # PACS only, 10 train images per class, no uncached LoRA
                                                    # (its optimisation is lora-text-cached's): < 10 min from cold
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F

from hf_clip_forget.api import add_forget_adapter
from hf_clip_forget.cli import cached_image_features, load_dual_encoder
from hf_clip_forget.core import IMAGENET_TEMPLATES
from hf_clip_forget.core.prompt_cache import clear_prompt_cache, prompt_cache_disabled
from hf_clip_forget.evaluation import (
    class_embeddings,
    embed_images,
    load_labelled_images,
    project_image_features,
    score_predictions,
    zero_shot_logits,
)


EXCLUDED = {"BACKGROUND_Google"}
OURS = ("nullspace", "nullspace-plain", "ccup", "multimodal")


def saved_bytes(save) -> int:
    """Bytes that ``save(folder)`` writes into an empty folder: the size of the artefact a method ships."""
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def forget_class(class_names, seed: int) -> str:
    return random.Random(seed).sample([c for c in class_names if c not in EXCLUDED], 1)[0]


def accuracies(image_embeds, text, features, forget):
    report = score_predictions(zero_shot_logits(image_embeds, text).argmax(dim=-1), features, [forget])
    return report.forget_accuracy, report.retain_accuracy


@contextlib.contextmanager
def cold_prompt_cache():
    """An empty prompt-embedding cache (memory and disk) for what runs inside: a first edit, as on a fresh machine."""
    with tempfile.TemporaryDirectory() as home:
        previous = os.environ.get("HF_HOME")
        os.environ["HF_HOME"] = home  # the prompt cache reads HF_HOME when it is used
        clear_prompt_cache()
        try:
            yield
        finally:
            clear_prompt_cache()
            if previous is None:
                del os.environ["HF_HOME"]
            else:
                os.environ["HF_HOME"] = previous


def projection_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "projection" in n}


# ------------------------------------------------------------------------------------------------------------ ours
def run_ours(variant, model, tokenizer, processor, features, text, forget) -> dict:
    """A first edit (cold prompt cache), then the same edit again (warm cache: a repeated edit)."""
    with cold_prompt_cache():
        row = edit_ours(variant, model, tokenizer, processor, features, text, forget)
        repeat = edit_ours(variant, model, tokenizer, processor, features, text, forget)
    return {**row, "repeat_edit_seconds": repeat["edit_seconds"], "cache": "cold (first edit); warm for the repeat"}


def edit_ours(variant, model, tokenizer, processor, features, text, forget) -> dict:
    names = list(features.class_names)
    others = [c for c in names if c != forget]
    options = {"method": "nullspace"} if variant.startswith("nullspace") else {"method": "ccup"}
    if variant == "nullspace-plain":  # the class name alone: no retain names to embed (faster, less precise)
        others = None
    if variant == "multimodal":
        options |= {"prototypes": 4, "paradigm": "global", "image_processor": processor}
    original = projection_weights(model)
    start = time.perf_counter()
    edited = add_forget_adapter(model, [forget], tokenizer, retain_classes=others, show_progress=False, **options)
    seconds = time.perf_counter() - start
    forget_acc, retain_acc = accuracies(project_image_features(edited, features), text, features, forget)
    size = saved_bytes(edited.save_pretrained)
    edited.merge_adapter()
    edited.unmerge_adapter()
    base = edited.unload()
    reverts = all(torch.equal(w, original[n]) for n, w in projection_weights(base).items())
    return {"forget_accuracy": forget_acc, "retain_accuracy": retain_acc, "edit_seconds": seconds,
            "artifact_bytes": size, "reverts_exactly": reverts}  # fmt: skip


# ---------------------------------------------------------------------------------------------- (a) LoRA, text side
def run_lora(model, tokenizer, features, forget, steps: int, cached: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    names = list(features.class_names)
    start = time.perf_counter()
    work = copy.deepcopy(model)
    original = projection_weights(work)
    templates = list(IMAGENET_TEMPLATES[:8])  # a few prompts per class per step

    def tower_inputs(prompts):
        return tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")

    with torch.no_grad(), prompt_cache_disabled():  # the baseline has no prompt cache: it encodes what it needs
        base_text = class_embeddings(work, tokenizer, names, show_progress=False)
        similar = (base_text @ base_text[names.index(forget)]).argsort(descending=True).tolist()
        retain_names = [names[i] for i in similar if names[i] != forget][:5]
        forget_prompts = [t.format(forget) for t in templates]
        retain_prompts = [t.format(c) for c in retain_names for t in templates]
        empty = F.normalize(work.get_text_features(**tower_inputs([""])).pooler_output, dim=-1)
        retain_target = F.normalize(work.get_text_features(**tower_inputs(retain_prompts)).pooler_output, dim=-1)
    torch.manual_seed(0)  # LoRA's initialisation, independent of what ran before
    lora = get_peft_model(work, LoraConfig(r=5, lora_alpha=5, target_modules=["text_projection"], lora_dropout=0.0))
    projection = lora.base_model.model.text_projection
    if cached:
        captured = {}
        hook = projection.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
        with torch.no_grad():
            lora.get_text_features(**tower_inputs(forget_prompts))
            forget_hidden = captured["x"].clone()
            lora.get_text_features(**tower_inputs(retain_prompts))
            retain_hidden = captured["x"].clone()
        hook.remove()
    parameters = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    forget_inputs, retain_inputs = tower_inputs(forget_prompts), tower_inputs(retain_prompts)
    for _ in range(steps):
        if cached:
            forget_feats, retain_feats = projection(forget_hidden), projection(retain_hidden)
        else:
            forget_feats = lora.get_text_features(**forget_inputs).pooler_output
            retain_feats = lora.get_text_features(**retain_inputs).pooler_output
        forget_loss = (F.normalize(forget_feats, dim=-1) - empty).pow(2).sum(-1).mean()
        retain_loss = (F.normalize(retain_feats, dim=-1) - retain_target).pow(2).sum(-1).mean()
        loss = forget_loss + retain_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        text = class_embeddings(lora, tokenizer, names, show_progress=False, use_cache=False)
        forget_acc, retain_acc = accuracies(project_image_features(model, features), text, features, forget)
    size = saved_bytes(lora.save_pretrained)
    lora.merge_adapter()
    lora.unmerge_adapter()
    reverts = all(torch.equal(w, original[n]) for n, w in projection_weights(lora.unload()).items())
    return {"forget_accuracy": forget_acc, "retain_accuracy": retain_acc, "edit_seconds": seconds,
            "artifact_bytes": size, "reverts_exactly": reverts}  # fmt: skip


# ------------------------------------------------------------------------------ real train images for (b) and (c)
_TRAIN_CACHE: dict[tuple, tuple] = {}


def train_features(model, processor, data_dir, dataset, forget, per_class):
    """Pre-projection features of up to ``per_class`` train images per class (the forget class: 10× as many), and
    the seconds it took; computed once per task and shared by (b) and (c), each of which is charged the time."""
    key = (dataset, forget, per_class)
    if key in _TRAIN_CACHE:
        return _TRAIN_CACHE[key]
    start = time.perf_counter()
    split = load_labelled_images(os.path.join(data_dir, dataset, "train.parquet"), split="train")
    names = split.features["label"].names
    rng = random.Random(0)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(split["label"]):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for label, indices in sorted(by_class.items()):
        count = per_class * (10 if names[label] == forget else 1)
        chosen += rng.sample(indices, min(count, len(indices)))
    features = embed_images(model, split.select(sorted(chosen)), processor, show_progress=False)
    _TRAIN_CACHE[key] = (features, time.perf_counter() - start)
    return _TRAIN_CACHE[key]


def run_gradient_ascent(model, processor, data_dir, dataset, features, text, forget, per_class) -> dict:
    train, data_seconds = train_features(model, processor, data_dir, dataset, forget, per_class)
    start = time.perf_counter() - data_seconds
    names = list(features.class_names)
    mask = train.labels == names.index(forget)
    x, y = train.features[mask].clone(), train.labels[mask].clone()  # ordinary tensors, usable by autograd
    projection = copy.deepcopy(model.visual_projection).requires_grad_(True)
    optimizer = torch.optim.Adam(projection.parameters(), lr=1e-4)
    scale = model.logit_scale.exp().item()
    with torch.enable_grad():
        for _ in range(200):
            logits = scale * F.normalize(projection(x), dim=-1) @ text.T
            if (logits.argmax(-1) == y).float().mean() <= 0.01:
                break
            loss = -F.cross_entropy(logits, y)  # ascent: push the forget images away from their label
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        forget_acc, retain_acc = accuracies(projection(features.features), text, features, forget)
    from safetensors.torch import save_file

    weight = {"visual_projection.weight": projection.weight.detach().contiguous()}
    size = saved_bytes(lambda folder: save_file(weight, f"{folder}/model.safetensors"))
    return {"forget_accuracy": forget_acc, "retain_accuracy": retain_acc, "edit_seconds": seconds,
            "artifact_bytes": size, "reverts_exactly": False,  # fine-tuned in place; no inverse is kept
            "note": f"{int(mask.sum())} real forget images"}  # fmt: skip


def run_leace(model, processor, data_dir, dataset, features, text, forget, per_class) -> dict:
    from concept_erasure import LeaceEraser

    train, data_seconds = train_features(model, processor, data_dir, dataset, forget, per_class)
    start = time.perf_counter() - data_seconds
    names = list(features.class_names)
    embeds = project_image_features(model, train)
    concept = (train.labels == names.index(forget)).float()[:, None]
    eraser = LeaceEraser.fit(embeds.float(), concept)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        erased = eraser(project_image_features(model, features).float())
    forget_acc, retain_acc = accuracies(erased, text, features, forget)
    from safetensors.torch import save_file

    tensors = {"proj_left": eraser.proj_left, "proj_right": eraser.proj_right}
    if eraser.bias is not None:
        tensors["bias"] = eraser.bias
    size = saved_bytes(
        lambda folder: save_file({k: v.contiguous() for k, v in tensors.items()}, f"{folder}/eraser.safetensors")
    )
    # applied to the embeddings (affine: it cannot be merged into the bias-free projection); the weights never change
    return {"forget_accuracy": forget_acc, "retain_accuracy": retain_acc, "edit_seconds": seconds,
            "artifact_bytes": size, "reverts_exactly": True, "note": "post-projection hook; weights untouched"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- scale
def run_scale(model, tokenizer, features, text, counts=(1, 10, 50), stacked=20) -> list[dict]:
    names = [c for c in features.class_names if c not in EXCLUDED]
    rows = []
    for count in counts:
        forget = random.Random(count).sample(names, count)
        others = [c for c in features.class_names if c not in forget]
        for method in ("nullspace", "ccup"):
            start = time.perf_counter()
            edited = add_forget_adapter(
                model, forget, tokenizer, method=method, retain_classes=others, show_progress=False
            )
            seconds = time.perf_counter() - start
            report = score_predictions(
                zero_shot_logits(project_image_features(edited, features), text).argmax(-1), features, forget
            )
            edited.unload()
            rows.append({"setting": f"{count} classes at once", "method": method, "edit_seconds": seconds,
                         "forget_accuracy": report.forget_accuracy, "retain_accuracy": report.retain_accuracy})  # fmt: skip
    forget = random.Random(stacked).sample(names, stacked)
    start = time.perf_counter()
    edited = model
    for i, name in enumerate(forget):  # one class at a time, plain nullspace (no retain names to re-embed)
        edited = add_forget_adapter(edited, [name], tokenizer, adapter_name=f"a{i}", show_progress=False)
    seconds = time.perf_counter() - start
    report = score_predictions(
        zero_shot_logits(project_image_features(edited, features), text).argmax(-1), features, forget
    )
    merge_start = time.perf_counter()
    edited.merge_adapter()
    merge_seconds = time.perf_counter() - merge_start
    edited.unmerge_adapter()
    edited.unload()
    rows.append({"setting": f"{stacked} stacked adapters (1 class each)", "method": "nullspace", "edit_seconds": seconds,
                 "forget_accuracy": report.forget_accuracy, "retain_accuracy": report.retain_accuracy,
                 "merge_seconds": merge_seconds})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--datasets", default="cifar10,caltech101,pacs")
    parser.add_argument("--lora-steps", type=int, default=2000)
    parser.add_argument("--train-per-class", type=int, default=20, help="real train images per class for (b), (c)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="PACS only, 10 train images per class, LoRA on cached features only",
    )
    parser.add_argument("--scale", action="store_true", help="also 1/10/50 Caltech-101 classes and 20 stacked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.train_per_class = "pacs", 10
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)

    model, tokenizer, processor = load_dual_encoder("demo")
    rows = []
    for dataset in args.datasets.split(","):
        path = os.path.join(args.data_dir, dataset, "test.parquet")
        features = cached_image_features(model, processor, path, "test", "demo")
        text = class_embeddings(model, tokenizer, features.class_names, show_progress=False)
        forget = forget_class(list(features.class_names), args.seed)
        task = f"{dataset}: forget {forget}"
        before = accuracies(project_image_features(model, features), text, features, forget)
        print(f"\n{task} — before: forget {100 * before[0]:.1f} %, retain {100 * before[1]:.1f} %", flush=True)
        per_class = args.train_per_class
        runs = {
            variant: partial(run_ours, variant, model, tokenizer, processor, features, text, forget)
            for variant in OURS
        }
        if not args.quick:  # the same optimisation as lora-text-cached, plus a text-tower pass per step
            runs["lora-text"] = partial(run_lora, model, tokenizer, features, forget, args.lora_steps, cached=False)
        runs["lora-text-cached"] = partial(run_lora, model, tokenizer, features, forget, args.lora_steps, cached=True)
        data = (model, processor, args.data_dir, dataset, features, text, forget, per_class)
        runs["gradient-ascent"] = partial(run_gradient_ascent, *data)
        runs["leace"] = partial(run_leace, *data)
        for method, run in runs.items():
            with torch.enable_grad() if method.startswith(("lora", "gradient")) else torch.no_grad():
                row = {"method": method, "task": task, **run()}
            rows.append(row)
            print(f"  {method:<17} forget {100 * row['forget_accuracy']:5.1f} %  retain {100 * row['retain_accuracy']:5.1f} %"
                  f"  {row['edit_seconds']:7.1f} s  {row['artifact_bytes']:>9,} B  reverts {row['reverts_exactly']}"
                  + (f"  (repeat, cache warm: {row['repeat_edit_seconds']:.2f} s)" if "repeat_edit_seconds" in row else ""),
                  flush=True)  # fmt: skip
        ours = next(r["edit_seconds"] for r in rows if r["task"] == task and r["method"] == "nullspace")
        for row in rows:
            if row["task"] == task:
                row["time_ratio_to_ours"] = row["edit_seconds"] / ours
    print(
        f"\n{'method':<17} {'task':<28} {'forget':>7} {'retain':>7} {'edit s':>8} {'× ours':>7} {'bytes':>10} reverts"
    )
    for r in rows:
        print(f"{r['method']:<17} {r['task'][:28]:<28} {100 * r['forget_accuracy']:6.1f}% {100 * r['retain_accuracy']:6.1f}%"
              f" {r['edit_seconds']:8.1f} {r['time_ratio_to_ours']:7.1f} {r['artifact_bytes']:>10,} {r['reverts_exactly']}")  # fmt: skip
    scale = []
    if args.scale:
        path = os.path.join(args.data_dir, "caltech101", "test.parquet")
        features = cached_image_features(model, processor, path, "test", "demo")
        text = class_embeddings(model, tokenizer, features.class_names, show_progress=False)
        scale = run_scale(model, tokenizer, features, text)
        print("\nscale (Caltech-101):")
        for r in scale:
            extra = f", merge {1000 * r['merge_seconds']:.0f} ms" if "merge_seconds" in r else ""
            print(f"  {r['setting']:<34} {r['method']:<10} {r['edit_seconds']:6.1f} s  forget {100 * r['forget_accuracy']:5.1f} %"
                  f"  retain {100 * r['retain_accuracy']:5.1f} %{extra}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "scale": scale}, handle, indent=2)


if __name__ == "__main__":
    main()
