#!/usr/bin/env python
"""Measure forget adapters on every supported model family (issue 11): edit build time and forward cost.

One model class per family of ``hf_clip_forget.families.FAMILIES`` (its first class: ``OwlViTModel`` stands for
OWL-ViT/OWLv2 embeddings; the two detectors, CLAP, SigLIP, SigLIP 2 and BLIP retrieval are families of their own).
Each model is *randomly initialised* with the real shapes of the family's base checkpoint: the transformers config
defaults, which are those shapes, plus the overrides in ``REAL_SHAPES`` where a default is not (e.g. OWLv2's
960-pixel input, ALIGN's 289). The text tower takes ``tiny_tokenizer()`` (vocab 1000, [PAD]/[BOS]/[EOS] = 0/2/3):
its vocab is set to 1000 and its special ids to 0/2/3; the cost of a text tower is its width and depth times the
prompt length, not its vocabulary. The vision-text dual encoder is the embedded demo model (real weights) with its
own tokenizer.

Measured, in this order, per family (``time.perf_counter``, ``torch.no_grad``, eval mode, torch's default threads):

1. **Edit build**: ``model.add_forget_adapter(TINY_CLASS_NAMES[:10], tokenizer=tok, show_progress=False)`` with
   the family's default templates (80 photo templates; 8 sound templates for CLAP): one warm-up call, then the
   median of ``--repeats`` calls (each adapter is ``unload()``-ed, untimed, before the next call).
2. **Forward cost** of the query side, interleaved in rotating order over ``--rounds`` rounds after one warm-up
   forward each: the base model (inside ``with model.disable_adapter():``, entered untimed), the unmerged adapter and
   the merged one (``merge_adapter()``; refused for the output edits of SigLIP, SigLIP 2 and ALIGN: "n/a
   (refused)"). Images and audio: the family's declared image-side embedding
   (``hf_clip_forget.core.image_side_embeddings``: ``get_image_features`` for most, FLAVA's token 0, BLIP
   retrieval's ``vision_proj`` of the tower's first token, CLAP's ``get_audio_features``) on ``--batch`` random
   images at the model's input size (SigLIP 2: a square image's 16x16 patches, with mask and grid) or 10 s of random
   64-bin log-mel features; detectors: the detection forward on one image with 4 text queries. Reported: the median
   ms per forward and the ratios of the medians to the base model's.

Every row records when it was measured and the 1-min load average before and after it (``run``). ``--update FILE``
measures only ``--families`` and replaces or adds their rows in an existing results file, keeping the other rows;
the run (machine, settings, command, wall time) is appended to the file's ``updates``.

Usage::

    python scripts/measure_families.py --quick                       # tiny models, ~30 s
    python scripts/measure_families.py --json docs/families_benchmark.json      # ~50 min on 2 idle cores
    python scripts/measure_families.py --families CLIPModel --repeats 1         # ~40 s
    python scripts/measure_families.py --families FlavaModel,BlipForImageTextRetrieval,AlignModel,Siglip2Model \
        --update docs/families_benchmark.json                                   # ~13 min

Expected time per family at the default settings, on 2 idle cores: SigLIP and SigLIP 2 ~7 min each (text padded
to 64 tokens), AltCLIP ~7 min, OWLv2 detection ~4 min, BLIP retrieval ~3 min, FLAVA ~2 min, ALIGN ~75 s
(EfficientNet-B7 at 289 px: ~1.3 s per forward of 4 images), the others 1–3 min.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


VIT_L14 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14)
#: Overrides of the config defaults where these are not the base checkpoint's shapes (class: (config, {sub: {…}})).
REAL_SHAPES: dict[str, tuple[str, dict]] = {
    "CLIPModel": ("CLIPConfig", {}),  # openai/clip-vit-base-patch32
    "MetaClip2Model": ("MetaClip2Config", {}),  # ViT-B/32 (facebook/metaclip-2-mt5-worldwide-b32)
    "CLIPSegModel": ("CLIPSegConfig", {"vision_config": {"patch_size": 16}}),  # CIDAS/clipseg-rd64-refined
    "AltCLIPModel": ("AltCLIPConfig", {"vision_config": VIT_L14}),  # BAAI/AltCLIP: ViT-L/14 + XLM-R large (default)
    "ChineseCLIPModel": ("ChineseCLIPConfig", {"vision_config": {"patch_size": 16}}),  # chinese-clip-vit-base-patch16
    "Aimv2Model": ("Aimv2Config", {}),  # apple/aimv2-large-patch14-224-lit
    "BlipModel": ("BlipConfig", {"text_config": {"sep_token_id": 3}}),  # Salesforce/blip-itm-base-coco, 384 px
    "OwlViTModel": ("OwlViTConfig", {}),  # google/owlvit-base-patch32, 768 px
    "SiglipModel": ("SiglipConfig", {}),  # google/siglip-base-patch16-224
    "OwlViTForObjectDetection": ("OwlViTConfig", {}),
    "Owlv2ForObjectDetection": ("Owlv2Config", {"vision_config": {"image_size": 960}}),  # owlv2-base-patch16
    "ClapModel": ("ClapConfig", {}),  # laion/clap-htsat-unfused
    "GroupViTModel": ("GroupViTConfig", {}),  # nvidia/groupvit-gcc-yfcc
    # defaults = facebook/flava-full (ViT-B/16 224 px, BERT-base text, 6-layer multimodal encoder, projections 768)
    "FlavaModel": ("FlavaConfig", {}),
    # Salesforce/blip-itm-base-coco (384 px): its text tower has 12 heads, the default 8 (same FLOPs at width 768)
    "BlipForImageTextRetrieval": ("BlipConfig", {"text_config": {"sep_token_id": 3, "num_attention_heads": 12}}),
    # kakaobrain/align-base: EfficientNet-B7 (the defaults) + BERT-base, projection 640. The default image_size is
    # B7's 600; transformers' ALIGN conversion script sets 289 (and hidden_dim 640, the pooler's kernel: whole map
    # either way) and a processor resizing to 346 then center-cropping 289, the paper's resolution. Assumed: 289 px
    # (align-base's processor config is not available offline)
    "AlignModel": ("AlignConfig", {"vision_config": {"image_size": 289, "hidden_dim": 640}}),
    # defaults = google/siglip2-base-patch16-naflex (ViT-B/16, 256 position embeddings, 64 text positions):
    # siglip2-base-patch16-224 is a fixed-resolution checkpoint that loads as SiglipModel (SigLIP's row). The NaFlex
    # processor (max_num_patches=256) resizes a square image to 16x16 patches: 256 patches, not 224 px's 196
    "Siglip2Model": ("Siglip2Config", {}),
}
#: input size the processor feeds when it differs from the config's image_size (CLIPSeg interpolates positions)
INPUT_SIZE = {"CLIPSegModel": 352}
TEXT_FIT = dict(vocab_size=1000, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # tiny_tokenizer's ids
QUERIES = ["a photo of a cat.", "a photo of a dog.", "a photo of a horse.", "a photo of a truck."]
CLAP_FRAMES, CLAP_MELS = 1001, 64  # 10 s at 48 kHz, hop 480 (ClapFeatureExtractor defaults)


def family_classes() -> list[str]:
    from hf_clip_forget.families import FAMILIES

    return [family.model_classes[0] for family in FAMILIES]


def machine_info() -> dict:
    import peft
    import transformers

    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else contextlib.nullcontext([]) as lines:
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu or platform.processor(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        **{"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        **{"python": platform.python_version(), "platform": platform.platform()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def load_average() -> float | None:
    """The 1-min load average (the machine may be shared), or ``None`` where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------------------------------------- models
def real_model(class_name: str):
    """``(model, tokenizer)``: a random ``class_name`` with its base checkpoint's shapes, fitting tiny_tokenizer."""
    import transformers

    from hf_clip_forget.testing_utils import tiny_tokenizer

    if class_name == "VisionTextDualEncoderModel":
        from hf_clip_forget.models.demo import load_demo_model

        model, processor = load_demo_model()
        return model, processor.tokenizer
    config_name, overrides = REAL_SHAPES[class_name]
    config_class = getattr(transformers, config_name)
    default_positions = config_class().text_config.max_position_embeddings
    text = dict(TEXT_FIT, max_position_embeddings=max(default_positions, 64), **overrides.get("text_config", {}))
    config = config_class(**{**overrides, "text_config": text})
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config).eval(), tiny_tokenizer()


def image_inputs(model, class_name: str, images: int, generator) -> dict:
    """Random images at the model's input size; SigLIP 2: a square image's patches as its processor cuts them."""
    vision = getattr(model.config, "vision_config", None) or model.config.image_config  # FLAVA: image_config
    if class_name == "Siglip2Model":  # (batch, patches, 3·p·p) flattened patches, all real, on a square grid
        side, patch = math.isqrt(vision.num_patches), vision.patch_size
        return {
            "pixel_values": torch.randn(images, side * side, 3 * patch * patch, generator=generator),
            "pixel_attention_mask": torch.ones(images, side * side, dtype=torch.int32),
            "spatial_shapes": torch.tensor([[side, side]] * images),
        }
    size = INPUT_SIZE.get(class_name) or getattr(vision, "image_size", 224)
    return {"pixel_values": torch.randn(images, 3, size, size, generator=generator)}


def query_inputs(model, class_name: str, tokenizer, batch: int, quick: bool) -> tuple[str, dict]:
    """``(kind, kwargs)`` of the query-side forward: "image", "audio" or "detect"."""
    from hf_clip_forget.testing_utils import tiny_audio_inputs, tiny_pixel_inputs

    generator = torch.Generator().manual_seed(1)
    if class_name == "ClapModel":
        if quick:
            return "audio", tiny_audio_inputs(batch)
        features = torch.randn(batch, 1, CLAP_FRAMES, CLAP_MELS, generator=generator)
        return "audio", {"input_features": features, "is_longer": torch.zeros(batch, 1, dtype=torch.bool)}
    detect = class_name.endswith("ForObjectDetection")
    images = 1 if detect else batch
    if quick:
        pixels = tiny_pixel_inputs(class_name, images)
    else:
        pixels = image_inputs(model, class_name, images, generator)
    if not detect:
        return "image", pixels
    text = tokenizer(QUERIES, padding=True, return_tensors="pt")
    return "detect", {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], **pixels}


def run_query(model, kind: str, inputs: dict) -> torch.Tensor:
    """The query-side output: the image (or audio) joint embeddings as the family declares them (FLAVA's token 0,
    BLIP retrieval's ``vision_proj`` of the tower's first token), or the detector's box logits."""
    from hf_clip_forget.core import image_side_embeddings

    if kind == "detect":
        return model(**inputs).logits
    return image_side_embeddings(model, **inputs)


# ---------------------------------------------------------------------------------------------------- measuring
def measure_edit(model, tokenizer, repeats: int) -> tuple[dict, object]:
    """Warm-up, then ``repeats`` timed builds; returns the numbers and the last (kept) ForgetPeftModel."""
    from hf_clip_forget.testing_utils import TINY_CLASS_NAMES

    classes = list(TINY_CLASS_NAMES[:10])
    times, edited = [], None
    for _ in range(repeats + 1):
        if edited is not None:
            model = edited.unload()
        gc.collect()
        start = time.perf_counter()
        edited = model.add_forget_adapter(classes, tokenizer=tokenizer, show_progress=False)
        times.append(time.perf_counter() - start)
    config = edited.peft_config["default"]
    result = dict(classes=len(classes), templates=len(config.templates), prompts=len(classes) * len(config.templates))
    return dict(result, warmup_s=times[0], times_s=times[1:], median_s=statistics.median(times[1:])), edited


def _set_merged(model, merged: bool) -> None:
    is_merged = any(layer.merged for layer in model.base_model.forget_layers().values())
    if merged and not is_merged:
        model.merge_adapter()
    elif is_merged and not merged:
        model.unmerge_adapter()


def _timed_forward(model, variant: str, kind: str, inputs: dict) -> tuple[float, torch.Tensor]:
    """Seconds of one forward of ``variant``; entering ``disable_adapter`` (a walk over every module) is not timed."""
    _set_merged(model, variant == "merged")
    with model.disable_adapter() if variant == "base" else contextlib.nullcontext():
        start = time.perf_counter()
        output = run_query(model, kind, inputs)
        seconds = time.perf_counter() - start
    return seconds, output


@torch.no_grad()
def measure_forward(model, kind: str, inputs: dict, rounds: int) -> dict:
    """Interleaved base / unmerged / merged forwards (rotating order): median ms and ratios to the base."""
    variants, refused = ["base", "unmerged", "merged"], None
    try:
        _set_merged(model, True)
    except Exception as error:  # SigLIP's image side: merging is refused
        variants, refused = variants[:2], f"{type(error).__name__}: {error}"
    for variant in variants:  # warm-up
        _timed_forward(model, variant, kind, inputs)
    times = {v: [] for v in variants}
    outputs = {}
    for r in range(rounds):
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
            seconds, outputs[variant] = _timed_forward(model, variant, kind, inputs)
            times[variant].append(seconds)
    _set_merged(model, False)
    median_ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    result = {"kind": kind, "rounds": rounds, "times_s": times, "median_ms": median_ms, "merge_refused": refused}
    for v in variants[1:]:
        result[f"ratio_{v}"] = median_ms[v] / median_ms["base"]
        paired = [a / b for a, b in zip(times[v], times["base"], strict=True)]
        result[f"median_round_ratio_{v}"] = statistics.median(paired)
    result["max_abs_edited_vs_base"] = (outputs["unmerged"] - outputs["base"]).abs().max().item()
    if "merged" in outputs:
        result["max_abs_merged_vs_unmerged"] = (outputs["merged"] - outputs["unmerged"]).abs().max().item()
    return result


def measure_family(class_name: str, args, progress) -> dict:
    from hf_clip_forget.families import family_of
    from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer

    progress.set_postfix_str(f"{class_name}: building")
    run = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average": [load_average()]}
    start = time.perf_counter()
    with warnings.catch_warnings():  # transformers' notes on random configs (special ids, vocab) are expected
        warnings.simplefilter("ignore")
        model, tokenizer = (tiny_model(class_name), tiny_tokenizer()) if args.quick else real_model(class_name)
    row = {"class": class_name, "family": family_of(model).name, "build_s": time.perf_counter() - start}
    row["parameters"] = sum(p.numel() for p in model.parameters())
    progress.set_postfix_str(f"{class_name}: edit")
    row["edit"], edited = measure_edit(model, tokenizer, args.repeats)
    kind, inputs = query_inputs(edited.get_base_model(), class_name, tokenizer, args.batch, args.quick)
    row["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
    progress.set_postfix_str(f"{class_name}: forward")
    row["forward"] = measure_forward(edited, kind, inputs, args.rounds)
    run["load_average"].append(load_average())
    return dict(row, run=run)  # when and under what load this row was measured (rows of updates differ)


# ------------------------------------------------------------------------------------------------------- output
def describe_inputs(kind: str, shapes: dict) -> str:
    """A short description of the query inputs: "4 images 224 px", "1 image 960 px, 4 queries"."""
    if kind == "audio":
        batch, _, frames, mels = shapes["input_features"]
        return f"{batch} clips {frames}x{mels} mel"
    pixels = shapes["pixel_values"]
    size = f"{pixels[1]} patches" if "spatial_shapes" in shapes else f"{pixels[2]} px"  # SigLIP 2: pre-cut patches
    text = f"{pixels[0]} image{'s' if pixels[0] > 1 else ''} {size}"
    return text + (f", {shapes['input_ids'][0]} queries" if kind == "detect" else "")


def describe_machine(m: dict) -> str:
    return (
        f"{m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}; torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, peft {m['peft']}"
    )


def describe_run(run: dict) -> str:
    """When, with which settings and under what load a run (the first, or an ``--update``) was measured."""
    s, m = run["settings"], run["machine"]
    load = "/".join(f"{x[0]:.2f}" if x else "?" for x in (m["load_average_at_start"], run["load_average_at_end"]))
    return (
        f"{m['date']}: {'tiny models (--quick)' if s['quick'] else 'real base shapes'}, edit: median of "
        f"{s['repeats']}; forward: {s['rounds']} rounds; wall time {run['total_wall_s']:.0f} s "
        f"(1-min load average at start/end: {load})"
    )


def format_table(results: dict) -> str:
    out = [
        f"Machine: {describe_machine(results['machine'])}",
        f"Measured {describe_run(results)}",
    ]
    for update in results.get("updates", []):
        out.append(f"Rows of {', '.join(update['settings']['classes'])} updated {describe_run(update)}")
        if describe_machine(update["machine"]) != describe_machine(results["machine"]):
            out.append(f"  on another machine or versions: {describe_machine(update['machine'])}")
    out += [
        "",
        "| family | class | params (M) | prompts | edit s (median) | query input | base ms | unmerged ms "
        "| merged ms | unmerged / base | merged / base |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["families"]:
        if "error" in row:
            out.append(f"| {row.get('family', '?')} | `{row['class']}` | failed: {row['error']} |")
            continue
        edit, fwd = row["edit"], row["forward"]
        ms = fwd["median_ms"]
        shape = describe_inputs(fwd["kind"], row["inputs"])
        merged = f"{ms['merged']:.1f}" if "merged" in ms else "n/a (refused)"
        ratio = f"{fwd['ratio_merged']:.3f}" if "merged" in ms else "n/a (refused)"
        out.append(
            f"| {row['family']} | `{row['class']}` | {row['parameters'] / 1e6:.1f} | {edit['prompts']} | "
            f"{edit['median_s']:.2f} | {shape} | {ms['base']:.1f} | {ms['unmerged']:.1f} | "
            f"{merged} | {fwd['ratio_unmerged']:.3f} | {ratio} |"
        )
    return "\n".join(out)


def read_update(path: str, quick: bool) -> dict:
    """The results file that ``--update`` adds rows to, checked before anything is measured."""
    try:
        with open(path) as handle:
            previous = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(
            f"--update {path}: cannot read it as results JSON ({error}); use --json to start a file."
        ) from None
    if not {"machine", "settings", "families", "total_wall_s"} <= set(previous):
        raise SystemExit(f"--update {path}: not a results file of this script (keys {sorted(previous)}).")
    if previous["settings"]["quick"] != quick:
        raise SystemExit(
            f"--update {path}: its rows were measured {'with' if previous['settings']['quick'] else 'without'} "
            "--quick; tiny and real-shape rows would not be comparable. Rerun with the same --quick setting."
        )
    return previous


def merge_results(previous: dict, new: dict) -> dict:
    """``previous`` with the rows of ``new`` replacing those of the same class or added (family order), the other
    rows kept as they are; ``new``'s run (machine, settings, command, wall time) appended to ``"updates"``."""
    rows = {row["class"]: row for row in previous["families"]} | {row["class"]: row for row in new["families"]}
    order = family_classes()
    ranked = sorted(rows.values(), key=lambda row: order.index(row["class"]) if row["class"] in order else len(order))
    run = {k: new[k] for k in ("machine", "settings", "command", "total_wall_s", "load_average_at_end")}
    return {**previous, "families": ranked, "updates": [*previous.get("updates", []), run]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 repeat, 3 rounds (< 1 min)")
    parser.add_argument("--families", help="comma-separated model classes (default: one per family)")
    parser.add_argument("--repeats", type=int, help="timed add_forget_adapter calls per family (default 3)")
    parser.add_argument("--rounds", type=int, help="interleaved forward rounds (default 5; --quick 3)")
    parser.add_argument("--batch", type=int, default=4, help="images (or audio clips) per forward (4)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    output.add_argument(
        "--update", metavar="FILE", help="measure --families only and replace or add their rows in this results JSON"
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rounds = args.rounds or (3 if args.quick else 5)
    available = family_classes()
    args.classes = [c.strip() for c in args.families.split(",") if c.strip()] if args.families else available
    unknown = [c for c in args.classes if c not in available]
    if unknown:
        parser.error(f"unknown model class(es) {unknown}; choose from {available}")
    args.previous = read_update(args.update, args.quick) if args.update else None
    return args


def main(argv=None) -> dict:
    import transformers

    import hf_clip_forget  # noqa: F401  (registers the peft method and add_forget_adapter)

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    start = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("quick", "repeats", "rounds", "batch", "classes")}
    results = {"machine": machine_info(), "settings": settings, "families": []}
    results["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    with tqdm(args.classes, desc="families", file=sys.stderr, dynamic_ncols=True) as progress:
        for class_name in progress:
            try:
                row = measure_family(class_name, args, progress)
            except Exception as error:  # record and go on: one family must not cost the whole run
                row = {"class": class_name, "error": f"{type(error).__name__}: {error}"[:300]}
            results["families"].append(row)
            gc.collect()
    results["total_wall_s"] = time.perf_counter() - start
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.previous is not None:
        results = merge_results(args.previous, results)
    print(format_table(results), flush=True)
    path = args.json or args.update
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        print(f"Wrote {path}")
    return results


if __name__ == "__main__":
    main()
