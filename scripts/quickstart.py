"""The main job until the offline demo model exists: forget classes from a randomly initialised CLIP, offline.

It shows the mechanics a user relies on — the forgotten classes' directions vanish from image embeddings, other
classes are kept, the edit merges, unmerges bit for bit, stacks and reloads — on a tiny random CLIPModel built
on the spot. Being random, the model recognises nothing: effectiveness on real images is measured elsewhere.

    python scripts/quickstart.py [--classes cat,dog] [--alpha 1.0] [--method nullspace|ccup]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import hf_clip_forget
from hf_clip_forget.core import class_text_embeddings
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_tokenizer


KEPT = ["airplane", "bird", "ship", "truck"]


def image_features(model, pixels):
    output = model.get_image_features(pixel_values=pixels)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def mean_abs_cos(features, directions):
    return (torch.nn.functional.normalize(features, dim=-1) @ directions.T).abs().mean(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="cat,dog", help="comma-separated classes to forget")
    parser.add_argument("--alpha", type=float, default=1.0, help="nullspace strength in [0, 1]")
    parser.add_argument("--method", default="nullspace", choices=["nullspace", "ccup"])
    args = parser.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]

    tokenizer, model, pixels = tiny_tokenizer(extra_words=classes), tiny_clip(), random_pixels(64)
    with torch.no_grad():
        names = classes + KEPT
        directions = class_text_embeddings(
            model, tokenizer, names, hf_clip_forget.IMAGENET_TEMPLATES
        ).embeddings.float()
        before = mean_abs_cos(image_features(model, pixels), directions)
        options = {"retain_classes": KEPT} if args.method == "ccup" else {}
        edited = model.add_forget_adapter(
            classes, tokenizer=tokenizer, alpha=args.alpha, method=args.method, **options
        )
        after = mean_abs_cos(image_features(edited, pixels), directions)

        print(f"\nForget adapter on a tiny random CLIPModel: method={args.method}, alpha={args.alpha}")
        print(f"{'class':<12} {'role':<8} {'mean |cos(image, class)| before':>32} {'after':>10}")
        for i, name in enumerate(names):
            role = "forget" if name in classes else "keep"
            print(f"{name:<12} {role:<8} {before[i].item():>32.4f} {after[i].item():>10.2e}")

        weights = edited.base_model.model.visual_projection.weight.detach().clone()
        unmerged_output = image_features(edited, pixels)
        edited.merge_adapter()
        merged_gap = (image_features(edited, pixels) - unmerged_output).abs().max().item()
        edited.unmerge_adapter()
        exact = torch.equal(edited.base_model.model.visual_projection.weight, weights)
        with tempfile.TemporaryDirectory() as directory:
            edited.save_pretrained(directory)
            reloaded = hf_clip_forget.ForgetPeftModel.from_pretrained(tiny_clip(), directory)
            same = torch.equal(image_features(reloaded, pixels), unmerged_output)
    print(f"\nmerged vs unmerged output: max |difference| = {merged_gap:.1e}")
    print(f"unmerge restores the projection weights bit for bit: {exact}")
    print(f"save_pretrained -> ForgetPeftModel.from_pretrained gives identical outputs: {same}")
    print(f"the saved adapter records: forgotten_classes={edited.peft_config['default'].forgotten_classes}")


if __name__ == "__main__":
    main()
