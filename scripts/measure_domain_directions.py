"""Does the demo model's text know an image's domain? The AUC of each PACS domain's text direction.

For each PACS domain, the direction between the domain's class prompts and the other domains' (``DOMAIN_TEMPLATES``
over the 7 classes; :mod:`hf_clip_forget.evaluation.domain_directions`) scores every test image; the AUC of that
score separating the domain's images from the rest is printed (0.5: the text knows nothing of the domain). A model
trained domain-blind scores ~0.5; the goal of the shipped projections is ≥ 0.95 for every domain.

    python scripts/measure_domain_directions.py --data-dir ../shared/data --json docs/domain_directions.json
    python scripts/measure_domain_directions.py --projections /tmp/new.safetensors   # other projections
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hf_clip_forget.evaluation import embed_images, first_per_cell, load_labelled_images, project_image_features
from hf_clip_forget.evaluation.domain_directions import domain_class_embeddings, domain_direction_auc
from hf_clip_forget.models.demo import load_demo_model, load_demo_projections


def measure(model, processor, data_dir: str, split: str, per_cell: int | None) -> dict:
    dataset = load_labelled_images(os.path.join(data_dir, "pacs", f"{split}.parquet"), split=split)
    if per_cell:
        dataset = first_per_cell(dataset, per_cell)
    domains = dataset.features["domain"].names
    classes = dataset.features["label"].names
    with torch.no_grad():
        features = embed_images(model, dataset, processor.image_processor, show_progress=True)
        images = project_image_features(model, features)
        text = domain_class_embeddings(model, processor.tokenizer, domains, classes, show_progress=False)
    aucs = domain_direction_auc(images, features.domains, text)
    return {"split": split, "images": len(dataset), "auc": dict(zip(domains, aucs, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--split", default="test", help="PACS split to measure on (default: test)")
    parser.add_argument("--per-cell", type=int, default=None, help="only the first N images of each cell")
    parser.add_argument("--projections", default=None, help="a projections file instead of the shipped one")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()
    model, processor = load_demo_model()
    if args.projections:
        load_demo_projections(model, args.projections)
    result = measure(model, processor, args.data_dir, args.split, args.per_cell)
    result["projections"] = os.path.basename(args.projections) if args.projections else "shipped"
    for domain, auc in result["auc"].items():
        print(f"{domain:<14} AUC {auc:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
