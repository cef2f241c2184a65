"""Rebuild the demo model's projections: LiT-style contrastive training of two linear maps on frozen towers.

The towers (EfficientNet-Lite0, all-MiniLM-L6-v2) stay frozen; their features are computed once on the train
splits of CIFAR-10, PACS and Caltech-101 and cached. Only ``visual_projection`` (1280→256), ``text_projection``
(384→256) and the temperature are trained, on (image, caption) pairs whose captions are template sentences naming
the class — and, for PACS, the domain ("a sketch of a dog."). Seeded: the same command gives the same file.

    python scripts/train_demo_projections.py --data-dir ../shared/data

writes ``hf_clip_forget/models/demo_projections.safetensors`` and prints the zero-shot accuracy of the result on
every test split (PACS per domain), which ``docs/demo_model.md`` records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time

import datasets
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hf_clip_forget.core import DOMAIN_TEMPLATES, IMAGENET_TEMPLATES, PHOTO_TEMPLATES
from hf_clip_forget.evaluation.domain_directions import domain_direction_auc
from hf_clip_forget.models.demo import DEMO_PROJECTIONS_FILE, build_demo_towers, default_cache_dir


DATASETS = ("cifar10", "pacs", "caltech101")
# PACS domains → how a caption names them: hf_clip_forget.core.DOMAIN_TEMPLATES (shared with domain forgetting)


def load_split(data_dir: str, name: str, split: str) -> datasets.Dataset:
    path = os.path.join(data_dir, name, f"{split}.parquet")
    return datasets.load_dataset("parquet", data_files={split: path}, split=split)


@torch.no_grad()
def image_features(model, processor, dataset, cache_path: str, batch_size: int) -> torch.Tensor:
    """Pooled vision-tower features (before the projection) of every image, cached on disk."""
    if os.path.isfile(cache_path):
        return torch.load(cache_path)
    chunks = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"Vision features {os.path.basename(cache_path)}"):
        images = dataset[start : start + batch_size]["image"]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.contiguous(memory_format=torch.channels_last)  # ~1.5x faster depthwise convs on CPU
        chunks.append(model.vision_model(pixel_values=pixels).pooler_output.float())
    features = torch.cat(chunks)
    torch.save(features, cache_path)
    return features


@torch.no_grad()
def text_features(model, tokenizer, prompts: list[str], batch_size: int = 512) -> torch.Tensor:
    chunks = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
        chunks.append(model.text_model(**inputs).pooler_output.float())
    return torch.cat(chunks)


def cap_per_cell(split: datasets.Dataset, max_per_cell: int, seed: int) -> datasets.Dataset:
    """At most ``max_per_cell`` images per (domain, class) cell, drawn with a seeded shuffle."""
    domains = split["domain"] if "domain" in split.column_names else [0] * len(split)
    labels = split["label"]
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    counts: dict[tuple[int, int], int] = {}
    keep = []
    for index in order:
        cell = (domains[index], labels[index])
        counts[cell] = counts.get(cell, 0) + 1
        if counts[cell] <= max_per_cell:
            keep.append(index)
    return split.select(sorted(keep))


def build_training_set(model, processor, data_dir, cache_dir, batch_size, caps: dict[str, int], seed):
    """Cached image features, for each image the indices of the captions that describe it, the captions, and the
    (class, domain) cell each caption names (CIFAR-10 and Caltech-101 captions are photos)."""
    captions: list[str] = []
    caption_index: dict[str, int] = {}
    cell_of_caption: list[tuple[str, str]] = []
    features, caption_choices = [], []
    for name in DATASETS:
        split = cap_per_cell(load_split(data_dir, name, "train"), caps[name], seed)
        cache = os.path.join(cache_dir, f"{name}_train_cap{caps[name]}_seed{seed}.pt")
        feats = image_features(model, processor, split, cache, batch_size)
        classes = split.features["label"].names
        domains = split.features["domain"].names if "domain" in split.column_names else None
        labels = split["label"]
        domain_ids = split["domain"] if domains else [None] * len(labels)
        for label, domain in zip(labels, domain_ids, strict=True):
            domain_name = domains[domain] if domains else "photo"
            templates = DOMAIN_TEMPLATES[domain_name] if domains else PHOTO_TEMPLATES
            choices = []
            for template in templates:
                caption = template.format(classes[label])
                if caption not in caption_index:
                    caption_index[caption] = len(captions)
                    captions.append(caption)
                    cell_of_caption.append((classes[label], domain_name))
                choices.append(caption_index[caption])
            caption_choices.append(choices)
        features.append(feats)
    return torch.cat(features), caption_choices, captions, cell_of_caption


def positive_groups(cell_of_caption: list[tuple[str, str]], positives: str) -> torch.Tensor:
    """The group id of each caption: captions of one group are positives of each other's images. ``"cell"`` (as CLIP
    is trained: a caption is the positive of images of its own class *and domain*) or ``"class"`` (the first demo
    model's rule: every caption of the class, whatever domain it names — which teaches the projections to ignore
    domain)."""
    keys = [cell if positives == "cell" else cell[0] for cell in cell_of_caption]
    ids = {key: i for i, key in enumerate(sorted(set(keys)))}
    return torch.tensor([ids[key] for key in keys])


def train(image_feats, caption_choices, caption_feats, cell_of_caption, args) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    visual = torch.nn.Linear(image_feats.shape[1], args.projection_dim, bias=False)
    textual = torch.nn.Linear(caption_feats.shape[1], args.projection_dim, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # CLIP's initial log(1 / 0.07)
    params = [*visual.parameters(), *textual.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    caption_group = positive_groups(cell_of_caption, args.positives)
    n = image_feats.shape[0]
    steps = args.epochs * (n // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    progress = tqdm(total=steps, desc="Training projections")
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - args.batch_size + 1, args.batch_size):
            batch = order[start : start + args.batch_size]
            chosen = torch.tensor([random.choice(caption_choices[i]) for i in batch.tolist()])
            image = F.normalize(visual(image_feats[batch]), dim=-1)
            text = F.normalize(textual(caption_feats[chosen]), dim=-1)
            logits = logit_scale.exp().clamp(max=100) * image @ text.T
            # captions of the same group are positives too (a batch holds many images of one cell)
            same = (caption_group[chosen][:, None] == caption_group[chosen][None, :]).float()
            targets = same / same.sum(dim=1, keepdim=True)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{logit_scale.exp().item():.1f}")
    progress.close()
    return {
        "visual_projection.weight": visual.weight.detach().contiguous(),
        "text_projection.weight": textual.weight.detach().contiguous(),
        "logit_scale": logit_scale.detach().clone(),
    }


@torch.no_grad()
def zero_shot_report(model, processor, data_dir, cache_dir, state, batch_size) -> dict:
    """Zero-shot accuracy of the trained projections on every test split (80-template prompts, all classes)."""
    report = {}
    for name in DATASETS:
        split = load_split(data_dir, name, "test")
        feats = image_features(model, processor, split, os.path.join(cache_dir, f"{name}_test.pt"), batch_size)
        classes = split.features["label"].names
        prompts = [t.format(c) for c in classes for t in IMAGENET_TEMPLATES]
        text = F.normalize(
            text_features(model, processor.tokenizer, prompts) @ state["text_projection.weight"].T, dim=-1
        )
        class_emb = F.normalize(text.reshape(len(classes), len(IMAGENET_TEMPLATES), -1).mean(1), dim=-1)
        image = F.normalize(feats @ state["visual_projection.weight"].T, dim=-1)
        predictions = (image @ class_emb.T).argmax(dim=1)
        labels = torch.tensor(split["label"])
        report[name] = (predictions == labels).float().mean().item()
        if "domain" in split.column_names:
            domains = torch.tensor(split["domain"])
            domain_names = split.features["domain"].names
            for i, domain in enumerate(domain_names):
                mask = domains == i
                report[f"{name}/{domain}"] = (predictions[mask] == labels[mask]).float().mean().item()
            cell_embeds = []
            for domain in domain_names:
                prompts = [t.format(c) for c in classes for t in DOMAIN_TEMPLATES[domain]]
                embeds = F.normalize(
                    text_features(model, processor.tokenizer, prompts) @ state["text_projection.weight"].T, dim=-1
                )
                cell_embeds.append(embeds.reshape(len(classes), len(DOMAIN_TEMPLATES[domain]), -1).mean(dim=1))
            per_template = torch.stack(cell_embeds)
            aucs = domain_direction_auc(image, domains, per_template)
            for domain, auc in zip(domain_names, aucs, strict=True):
                report[f"{name}/domain_auc/{domain}"] = auc
    return report


def training_metadata(args, caps: dict[str, int]) -> dict[str, str]:
    """What determines the weights (not where files went), so that the same training gives the same file."""
    paths = {"data_dir", "output", "cache_dir", "json", "cap"}
    settings = {key: value for key, value in vars(args).items() if key not in paths}
    return {"seed": str(args.seed), "args": json.dumps({**settings, "caps": caps}, sort_keys=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--output", default=os.path.join("hf_clip_forget", "models", DEMO_PROJECTIONS_FILE))
    parser.add_argument("--cache-dir", default=None, help="where towers and cached features go")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--feature-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-per-cell", type=int, default=200, help="training images per (domain, class) cell; the towers are frozen"
    )
    parser.add_argument(
        "--cap",
        action="append",
        default=["cifar10=3000"],
        metavar="DATASET=N",
        help="per-dataset override of --max-per-cell (default: cifar10=3000, i.e. all of its train split: its 32-px "
        "images need more examples)",
    )
    parser.add_argument(
        "--positives",
        choices=("cell", "class"),
        default="cell",
        help="which captions are positives of an image: those of its (class, domain) cell, as CLIP is trained (the "
        "shipped projections), or every caption of its class whatever domain it names (the rule of the projections "
        "shipped before issue 22, which learned to ignore domain)",
    )
    parser.add_argument("--json", default=None, help="write the zero-shot report here")
    args = parser.parse_args()

    caps = {name: args.max_per_cell for name in DATASETS}
    caps.update({key: int(value) for key, value in (item.split("=") for item in args.cap)})
    cache_dir = args.cache_dir or default_cache_dir()
    feature_dir = os.path.join(cache_dir, "demo_features")
    os.makedirs(feature_dir, exist_ok=True)
    torch.set_grad_enabled(False)
    model, processor = build_demo_towers(cache_dir)
    model.vision_model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    image_feats, caption_choices, captions, cell_of_caption = build_training_set(
        model, processor, args.data_dir, feature_dir, args.feature_batch_size, caps, args.seed
    )
    caption_feats = text_features(model, processor.tokenizer, captions)
    print(f"{image_feats.shape[0]} training images, {len(captions)} captions ({time.perf_counter() - start:.0f} s)")
    torch.set_grad_enabled(True)
    start = time.perf_counter()
    state = train(image_feats, caption_choices, caption_feats, cell_of_caption, args)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    torch.set_grad_enabled(False)
    save_file(state, args.output, metadata=training_metadata(args, caps))
    digest = hashlib.sha256(open(args.output, "rb").read()).hexdigest()[:12]
    print(f"wrote {args.output} (sha256 {digest})")
    report = zero_shot_report(model, processor, args.data_dir, feature_dir, state, args.feature_batch_size)
    for key, value in report.items():
        print(f"{key:<28} {100 * value:6.2f} %" if "auc" not in key else f"{key:<28} {value:6.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
