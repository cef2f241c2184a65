"""Encoding throughput against its limit (issue 13): prompts/s of the library against a bare text-tower forward, and
images/s of the evaluation harness against a bare vision-tower forward, with what PyTorch offers on CPU.

Text: every prompt of ``--dataset``'s class names × the 80 templates, encoded

- ``library``: ``encode_prompts(..., use_cache=False)`` (deduplicated, batches sorted by token length,
  ``inference_mode``);
- ``bare``: the tokenizer and ``get_text_features`` in batches of the same size, in the given order (the limit the
  goal is stated against: library ≤ 1.05× bare);
- ``bare, sorted``: the same bare loop over length-sorted batches (what sorting alone buys).

Images: ``--images`` images of ``--dataset``'s test split (decoded once beforehand), embedded

- ``harness``: ``embed_images`` (decoding, preprocessing, forward, gathering);
- ``bare``: the image processor and the vision tower's forward in batches of the same size;
- variants of the bare forward on the pre-processed pixels alone: eager, channels-last, ``torch.compile`` (with
  ``--compile``; its first call compiles for minutes); each
  checked against eager (max relative error of the features, identical zero-shot predictions).

Each measurement is repeated ``--repeats`` times, interleaved, and the median kept.

    python scripts/benchmark_encoding.py --data-dir ../shared/data --json docs/encoding.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hf_clip_forget.cli import load_dual_encoder
from hf_clip_forget.cli.loading import load_data
from hf_clip_forget.core import IMAGENET_TEMPLATES, encode_prompts
from hf_clip_forget.core.text_embeddings import _length_sorted_batches, _Tokenization
from hf_clip_forget.evaluation import embed_images


BATCH_SIZE = 256
IMAGE_BATCH = 64


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def bare_text(model, tokenizer, prompts: list[str], batches: list[list[int]]) -> torch.Tensor:
    outputs = []
    with torch.no_grad():
        for batch in batches:
            inputs = tokenizer([prompts[i] for i in batch], padding=True, truncation=True, return_tensors="pt")
            output = model.get_text_features(**inputs)
            outputs.append(output if isinstance(output, torch.Tensor) else output.pooler_output)
    return torch.cat(outputs)


def measure_text(model, tokenizer, class_names: list[str], repeats: int) -> dict:
    prompts = [template.format(name) for name in class_names for template in IMAGENET_TEMPLATES]
    given = [list(range(s, min(s + BATCH_SIZE, len(prompts)))) for s in range(0, len(prompts), BATCH_SIZE)]
    ordered = _length_sorted_batches(_Tokenization.of(model, tokenizer), prompts, BATCH_SIZE)
    runs = {
        "library": lambda: encode_prompts(model, tokenizer, prompts, BATCH_SIZE, show_progress=False, use_cache=False),
        "bare": lambda: bare_text(model, tokenizer, prompts, given),
        "bare, sorted": lambda: bare_text(model, tokenizer, prompts, ordered),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run)[0])
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "prompts": len(prompts),
        "seconds": seconds,
        "prompts_per_second": {name: len(prompts) / s for name, s in seconds.items()},
        "library_over_bare": seconds["library"] / seconds["bare"],
        "all_seconds": times,
    }


def vision_forward(model, pixels: torch.Tensor, channels_last: bool = False, module=None) -> torch.Tensor:
    tower = module if module is not None else model.vision_model
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(pixels), IMAGE_BATCH):
            batch = pixels[start : start + IMAGE_BATCH]
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            outputs.append(tower(pixel_values=batch).pooler_output.clone())
    return torch.cat(outputs)


def measure_images(model, processor, dataset, repeats: int, use_compile: bool) -> dict:
    images = [image.convert("RGB") for image in dataset["image"]]
    pixels = torch.cat(
        [processor(images=images[s : s + IMAGE_BATCH], return_tensors="pt")["pixel_values"]
         for s in range(0, len(images), IMAGE_BATCH)]
    )  # fmt: skip

    def bare():
        with torch.inference_mode():
            return torch.cat([
                model.vision_model(
                    pixel_values=processor(images=images[s : s + IMAGE_BATCH], return_tensors="pt")["pixel_values"]
                ).pooler_output.clone()
                for s in range(0, len(images), IMAGE_BATCH)
            ])  # fmt: skip

    eager_features = vision_forward(model, pixels)
    tower_last = model.vision_model  # converted in place below, after the eager runs of each repeat
    compiled, compile_seconds = None, None
    runs = {
        "harness": lambda: (
            embed_images(model, dataset, processor, batch_size=IMAGE_BATCH, show_progress=False).features
        ),
        "bare (processor + forward)": bare,
        "preprocessing only": lambda: processor(images=images, return_tensors="pt")["pixel_values"],
        "forward: eager": lambda: vision_forward(model, pixels),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    times["forward: channels-last"] = []
    if use_compile:
        times["forward: torch.compile"] = []
    checks = {}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run)[0])
        tower_last.to(memory_format=torch.channels_last)
        seconds, features = timed(lambda: vision_forward(model, pixels, channels_last=True))
        times["forward: channels-last"].append(seconds)
        checks["forward: channels-last"] = features
        tower_last.to(memory_format=torch.contiguous_format)
        if not use_compile:
            continue
        if compiled is None:
            compiled = torch.compile(model.vision_model)
            compile_seconds, _ = timed(lambda c=compiled: vision_forward(model, pixels[:IMAGE_BATCH], module=c))
        seconds, features = timed(lambda c=compiled: vision_forward(model, pixels, module=c))
        times["forward: torch.compile"].append(seconds)
        checks["forward: torch.compile"] = features
    checks["harness"] = runs["harness"]()
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "images": len(images),
        "seconds": seconds,
        "images_per_second": {name: len(images) / s for name, s in seconds.items()},
        "harness_over_bare": seconds["harness"] / seconds["bare (processor + forward)"],
        "torch_compile_first_call_seconds": compile_seconds,
        "max_relative_error_vs_eager": {
            name: ((f - eager_features).norm(dim=1) / eager_features.norm(dim=1)).max().item()
            for name, f in checks.items()
        },
        "all_seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="caltech101", help="class names (text) and test images (vision)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (its first call takes minutes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, tokenizer, processor = load_dual_encoder(args.model)
    model.eval()
    dataset, _ = load_data(os.path.join(args.data_dir, args.dataset, "test.parquet"), "test")
    result = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()}}  # fmt: skip
    if not args.skip_text:
        result["text"] = text = measure_text(model, tokenizer, list(dataset.features["label"].names), args.repeats)
        print(f"text: {text['prompts']} prompts")
        for name, rate in text["prompts_per_second"].items():
            print(f"  {name:<14} {text['seconds'][name]:7.2f} s  {rate:8.0f} prompts/s")
        print(f"  library / bare = {text['library_over_bare']:.3f} (goal <= 1.05)")
    if not args.skip_images:
        result["images"] = measure_images(
            model, processor, dataset.select(range(args.images)), args.repeats, args.compile
        )
        images = result["images"]
        print(f"images: {images['images']} images of {args.dataset} test")
        for name, rate in images["images_per_second"].items():
            error = images["max_relative_error_vs_eager"].get(name)
            note = f"  max rel. error vs eager {error:.1e}" if error is not None else ""
            print(f"  {name:<28} {images['seconds'][name]:7.2f} s  {rate:7.1f} images/s{note}")
        print(f"  harness / bare = {images['harness_over_bare']:.3f}")
        if images["torch_compile_first_call_seconds"] is not None:
            print(f"  torch.compile first call {images['torch_compile_first_call_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
