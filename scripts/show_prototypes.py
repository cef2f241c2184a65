"""Draw synthesised visual prototypes of the demo model: one row per (domain, class) prompt.

    python scripts/show_prototypes.py --classes dog,person --output docs/prototypes.png

Each prototype is optimised (seeded) so that its image embedding matches the prompt's text embedding
(``hf_clip_forget.core.synthesize_prototypes``); the title of each tile is its final cosine with the prompt.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_clip_forget.cli import load_dual_encoder
from hf_clip_forget.core import class_text_embeddings, domain_templates, synthesize_prototypes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="dog,person")
    parser.add_argument("--domains", default="photo,art_painting,cartoon,sketch")
    parser.add_argument("--per-target", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="prototypes.png")
    args = parser.parse_args()

    model, tokenizer, processor = load_dual_encoder("demo")
    classes, domains = args.classes.split(","), args.domains.split(",")
    cells = [(c, d) for c in classes for d in domains]
    with torch.no_grad():
        targets = torch.cat(
            [
                class_text_embeddings(model, tokenizer, [c], domain_templates(d), show_progress=False).embeddings
                for c, d in cells
            ]
        )
    start = time.perf_counter()
    found = synthesize_prototypes(
        model,
        targets,
        per_target=args.per_target,
        steps=args.steps,
        seed=args.seed,
        image_size=dict(processor.crop_size)["height"],
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )
    seconds = time.perf_counter() - start
    print(f"{len(found)} prototypes, {args.steps} steps: {seconds:.0f} s ({seconds / len(found):.1f} s per prototype)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cells), args.per_target, figsize=(1.6 * args.per_target, 1.7 * len(cells)))
    for index in range(len(found)):
        row, column = divmod(index, args.per_target)
        axis = axes[row][column] if len(cells) > 1 else axes[column]
        axis.imshow(found.pixels[index].permute(1, 2, 0).numpy())
        axis.set_xticks([]), axis.set_yticks([])
        axis.set_title(f"cos {found.similarity[index]:.2f}", fontsize=7)
        if column == 0:
            axis.set_ylabel(f"{cells[row][1]}\n{cells[row][0]}", fontsize=8)
    fig.suptitle("Visual prototypes of the demo model (seeded; not real images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output, dpi=80)
    print(f"→ {args.output}")


if __name__ == "__main__":
    main()
