#!/usr/bin/env python
"""Benchmark forget adapters on CPU with the real shapes of CLIP ViT-B/32 and ViT-L/14.

The models are *randomly initialised* ``transformers.CLIPModel``s built from ``CLIPConfig`` with the published
hyperparameters of the two checkpoints: timing and memory depend on the shapes, not on the weights, so nothing is
downloaded. The tokenizer is ``hf_clip_forget.testing_utils.tiny_tokenizer()`` (a word-level vocabulary that fits
into CLIP's 49408 token ids), extended with 100 synthetic class names ``class0`` … ``class99`` to forget and 10
names ``keep0`` … ``keep9`` used as the CCUP retain set. Prompts are therefore shorter than with CLIP's BPE
tokenizer splits rare class names into several tokens, so text encoding of real class names can be slightly
slower than measured here.

What is measured (``time.perf_counter``, ``torch.no_grad``, ``model.eval()``, torch's default thread count):

1. **Building an edit** for 1, 10 and 100 classes with the ``"single"`` (1) and ``"imagenet"`` (80) template sets:
   (a) text encoding — ``class_text_embeddings(model, tok, classes, templates, average=True, show_progress=False)``;
   (b) solve — ``build_edit_factors("nullspace", emb)`` and ``build_edit_factors("ccup", emb, retain_emb)`` with the
   10 retain-class embeddings; (c) the total wall time of ``add_forget_adapter(copy.deepcopy(base), classes,
   tokenizer=tok, templates=..., show_progress=False)`` (the deepcopy is not timed). (a) and (c) alternate, so that
   a slow phase of a shared machine hits both alike. 100 classes x 80 templates (8000 prompts) is measured once,
   and by default only on ViT-B/32 (``--large-models``), to keep the default run under ~25 min on 2 CPU cores.
2. **Merge / unmerge**: the first ``merge_adapter()`` (which also composes the edit ``M``, cached afterwards), then
   the median of ``merge_adapter()`` and ``unmerge_adapter()`` over many cycles; plus a bit-exactness check.
3. **Image-embedding cost** of the merged model and of the unmerged adapter relative to the base model: three
   models with identical weights (base; wrapped, unmerged; wrapped, merged), one fixed batch of random
   ``pixel_values``, timed interleaved in rotating order; the ratio of the medians (and the median of the per-round
   ratios) is reported.
4. **Peak memory** of building an edit: for each configuration a fresh subprocess (this script in
   ``--memory-worker`` mode) builds the model, records ``ru_maxrss``, runs ``add_forget_adapter`` and records
   ``ru_maxrss`` again, so that the peak belongs to that one build. On Linux a child's ``ru_maxrss`` starts from
   the peak RSS of the process that spawned it, so the workers run first, before this process builds any model;
   ``VmHWM`` (reset just before the build through ``/proc/self/clear_refs``) gives the build's own peak as well.

Every timing also records a short fixed matmul ("probe") taken just before it, as a gauge of how fast the machine
was at that moment: small shared VMs have slow phases.

Usage::

    python scripts/benchmark_edit.py --quick                  # ViT-B/32 only, few repeats, no 100x80 (~5 min)
    python scripts/benchmark_edit.py --json bench.json        # ViT-B/32 and ViT-L/14 (see docs/benchmarks.md)
    python scripts/benchmark_edit.py --models l14 --large-models l14 --sections edit,memory
    python scripts/benchmark_edit.py --models l14 --sections image --image-rounds 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


# ------------------------------------------------------------------------------------------------------ model specs
#: Published hyperparameters of the two OpenAI CLIP checkpoints (openai/clip-vit-base-patch32, -large-patch14).
MODEL_SPECS = {
    "b32": dict(
        name="ViT-B/32",
        text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        vision=dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=32
        ),
        projection_dim=512,
    ),
    "l14": dict(
        name="ViT-L/14",
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        vision=dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14
        ),
        projection_dim=768,
    ),
}
COMMON_TEXT = dict(vocab_size=49408, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3)
COMMON_VISION = dict(image_size=224, num_channels=3)

FORGET_CLASSES = [f"class{i}" for i in range(100)]
RETAIN_CLASSES = [f"keep{i}" for i in range(10)]
CLASS_COUNTS = (1, 10, 100)
TEMPLATE_SETS = ("single", "imagenet")
#: 100 classes x 80 templates = 8000 prompts: minutes per run on a small CPU, so measured once and only for the
#: models named by --large-models
LARGE_CONFIG = ("imagenet", 100)
#: defaults per model for the interleaved image benchmark: (batch size, rounds)
IMAGE_DEFAULTS = {"b32": (8, 30), "l14": (2, 10)}
MERGE_RANKS = (1, 10, 100)


def build_model(key: str, seed: int = 0):
    """A randomly initialised ``CLIPModel`` with the real shapes of ``key`` (float32, eval mode)."""
    from transformers import CLIPConfig, CLIPModel

    spec = MODEL_SPECS[key]
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(COMMON_TEXT, **spec["text"]),
        vision_config=dict(COMMON_VISION, **spec["vision"]),
        projection_dim=spec["projection_dim"],
    )
    return CLIPModel(config).eval()


def build_tokenizer():
    from hf_clip_forget.testing_utils import tiny_tokenizer

    tokenizer = tiny_tokenizer(extra_words=FORGET_CLASSES + RETAIN_CLASSES)
    for name in FORGET_CLASSES + RETAIN_CLASSES:  # each name must be one known word, not [UNK]
        ids = tokenizer(name)["input_ids"]
        assert len(ids) == 3 and ids[1] != tokenizer.unk_token_id, (name, ids)
    return tokenizer


def n_templates(name: str) -> int:
    from hf_clip_forget.core import TEMPLATE_SETS as SETS

    return len(SETS[name])


# ---------------------------------------------------------------------------------------------------------- helpers
def machine_info() -> dict:
    import peft
    import transformers

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def timed(fn, *args, **kwargs):
    """``(seconds, fn(*args, **kwargs))``, after a garbage collection that is not timed."""
    gc.collect()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def speed_probe() -> float:
    """Seconds for a fixed float32 matmul workload (4 x 1024^3 multiply-adds): a record of how fast the (shared,
    possibly throttled) machine was when a row was measured. Lower is faster."""
    a = torch.ones(1024, 1024)
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return time.perf_counter() - start


def cpu_stat() -> dict | None:
    """Aggregate CPU jiffies from /proc/stat (user, system, idle, steal), to report stolen time over the run."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return dict(zip(names, values[: len(names)], strict=False))


def _own_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished children (the memory workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def summary(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
        "all_s": times,
    }


@contextlib.contextmanager
def quiet():
    """Silence peft/transformers warnings that are irrelevant to timing (they would clutter the tables)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------- 1. building an edit
def bench_edit(model, tokenizer, configs, repeats, large_repeats, solve_repeats, progress):
    """Rows of (templates, classes) timings; also returns the single-template embeddings for later sections."""
    from hf_clip_forget import add_forget_adapter
    from hf_clip_forget.core import build_edit_factors, class_text_embeddings, resolve_templates

    rows, kept = [], {}
    retain = {}
    for template_set, n_classes in configs:
        templates = resolve_templates(template_set)
        classes = FORGET_CLASSES[:n_classes]
        prompts = n_classes * len(templates)
        reps = large_repeats if (template_set, n_classes) == LARGE_CONFIG else repeats
        probe = speed_probe()
        if template_set not in retain:  # the CCUP retain set, embedded once per template set (not timed)
            progress.set_postfix_str(f"retain set, {template_set}")
            with torch.no_grad():
                retain[template_set] = class_text_embeddings(
                    model, tokenizer, RETAIN_CLASSES, templates, average=True, show_progress=False
                ).embeddings

        encode_times, total_times = [], []
        for r in range(reps):  # encode and add_forget_adapter alternate
            progress.set_postfix_str(f"encode {n_classes}x{len(templates)} ({r + 1}/{reps})")
            with torch.no_grad():
                seconds, result = timed(
                    class_text_embeddings, model, tokenizer, classes, templates, average=True, show_progress=False
                )
            encode_times.append(seconds)
            progress.set_postfix_str(f"add_forget_adapter {n_classes}x{len(templates)} ({r + 1}/{reps})")
            fresh = copy.deepcopy(model)
            with quiet():
                seconds, peft_model = timed(
                    add_forget_adapter,
                    fresh,
                    classes,
                    tokenizer=tokenizer,
                    templates=template_set,
                    show_progress=False,
                )
            total_times.append(seconds)
            rank = peft_model.peft_config["default"].rank_pattern["visual_projection"]
            del peft_model, fresh
            gc.collect()
        emb = result.embeddings

        progress.set_postfix_str(f"solve {n_classes}x{len(templates)}")
        null_times, ccup_times = [], []
        for _ in range(solve_repeats):
            seconds, null = timed(build_edit_factors, "nullspace", emb)
            null_times.append(seconds)
            seconds, ccup = timed(build_edit_factors, "ccup", emb, retain[template_set])
            ccup_times.append(seconds)
        # the same solves on one thread: small float64 LAPACK calls (SVD) are erratic with 2 threads on small VMs
        null_1t, ccup_1t = [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(solve_repeats):
                null_1t.append(timed(build_edit_factors, "nullspace", emb)[0])
                ccup_1t.append(timed(build_edit_factors, "ccup", emb, retain[template_set])[0])
        finally:
            torch.set_num_threads(threads)

        rows.append(
            {
                "templates": template_set,
                "n_templates": len(templates),
                "n_classes": n_classes,
                "n_prompts": prompts,
                "encode": summary(encode_times),
                "solve_nullspace": summary(null_times),
                "solve_ccup": summary(ccup_times),
                "solve_nullspace_1_thread": summary(null_1t),
                "solve_ccup_1_thread": summary(ccup_1t),
                "add_forget_adapter": summary(total_times),
                "rank_nullspace": int(null.forget.shape[1]),
                "rank_ccup": [int(ccup.forget.shape[1]), int(ccup.retain.shape[1])],
                "adapter_rank": rank,
                "speed_probe_s": probe,
            }
        )
        if template_set == "single":
            kept[n_classes] = emb
        kept[("retain", template_set)] = retain[template_set]
        progress.update(1)
    return rows, kept


# ------------------------------------------------------------------------------------------------ 2. merge/unmerge
def bench_merge(model, embeddings, cycles, progress):
    from hf_clip_forget import add_forget_adapter

    cases = [("nullspace", k) for k in MERGE_RANKS if k in embeddings]
    if 100 in embeddings and ("retain", "single") in embeddings:
        cases.append(("ccup", 100))
    rows = []
    for method, k in cases:
        probe = speed_probe()
        progress.set_postfix_str(f"merge {method} k={k}")
        options = dict(text_embeds=embeddings[k], classes=FORGET_CLASSES[:k], method=method, show_progress=False)
        if method == "ccup":
            options["retain_text_embeds"] = embeddings[("retain", "single")]
        with quiet():
            peft_model = add_forget_adapter(copy.deepcopy(model), **options)
        layer = peft_model.base_model.forget_layers()
        (layer,) = layer.values()
        original = layer.get_base_layer().weight.detach().clone()
        first, _ = timed(peft_model.merge_adapter)  # composes M (cached for later merges)
        unmerge_first, _ = timed(peft_model.unmerge_adapter)
        merge_times, unmerge_times = [], []
        for _ in range(cycles):
            seconds, _ = timed(peft_model.merge_adapter)
            merge_times.append(seconds)
            seconds, _ = timed(peft_model.unmerge_adapter)
            unmerge_times.append(seconds)
        exact = bool(torch.equal(layer.get_base_layer().weight, original))
        # the same under torch.set_num_threads(1); storing the same factors again empties the cached M, so the first
        # merge composes it again
        forget = layer.projection_edit_forget["default"].clone()
        retain = layer.projection_edit_retain["default"].clone() if method == "ccup" else None
        peft_model.base_model.set_factors("default", {"visual_projection": (forget, retain)})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            first_1t, _ = timed(peft_model.merge_adapter)
            timed(peft_model.unmerge_adapter)
            merge_1t, unmerge_1t = [], []
            for _ in range(cycles):
                merge_1t.append(timed(peft_model.merge_adapter)[0])
                unmerge_1t.append(timed(peft_model.unmerge_adapter)[0])
        finally:
            torch.set_num_threads(threads)
        exact = exact and bool(torch.equal(layer.get_base_layer().weight, original))
        rows.append(
            {
                "method": method,
                "n_classes": k,
                "rank": [int(layer.projection_edit_forget["default"].shape[1])]
                + ([int(layer.projection_edit_retain["default"].shape[1])] if method == "ccup" else []),
                "weight_shape": list(original.shape),
                "first_merge_s": first,
                "first_unmerge_s": unmerge_first,
                "merge": summary(merge_times),
                "unmerge": summary(unmerge_times),
                "first_merge_1_thread_s": first_1t,
                "merge_1_thread": summary(merge_1t),
                "unmerge_1_thread": summary(unmerge_1t),
                "round_trip_bit_exact": exact,
                "speed_probe_s": probe,
            }
        )
        del peft_model, layer
        gc.collect()
        progress.update(1)
    return rows


# ------------------------------------------------------------------------------------ 3. image-embedding overhead
def bench_image(model, embedding, n_classes, batch_size, rounds, warmup, progress):
    from hf_clip_forget import add_forget_adapter

    with quiet():
        unmerged = add_forget_adapter(
            copy.deepcopy(model), FORGET_CLASSES[:n_classes], text_embeds=embedding, show_progress=False
        )
        merged = add_forget_adapter(
            copy.deepcopy(model), FORGET_CLASSES[:n_classes], text_embeds=embedding, show_progress=False
        )
    merged.merge_adapter()
    models = {"base": model, "unmerged": unmerged, "merged": merged}
    for m in models.values():
        m.eval()
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)

    def features(m):
        out = m.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        for name, m in models.items():
            progress.set_postfix_str(f"image warm-up {name}")
            for _ in range(warmup):
                features(m)
        # sanity: the unmerged and merged adapters compute the same edit, and the edit changes the base features
        f_base, f_unmerged, f_merged = (features(m) for m in models.values())
    sanity = {
        "max_abs_diff_merged_vs_unmerged": float((f_merged - f_unmerged).abs().max()),
        "max_abs_diff_edited_vs_base": float((f_unmerged - f_base).abs().max()),
    }

    names = list(models)
    times = {name: [] for name in names}
    probes = [speed_probe()]
    with torch.no_grad():
        for r in range(rounds):
            progress.set_postfix_str(f"image round {r + 1}/{rounds}")
            order = names[r % 3 :] + names[: r % 3]
            for name in order:
                m = models[name]
                gc.collect()
                start = time.perf_counter()
                features(m)
                times[name].append(time.perf_counter() - start)
    probes.append(speed_probe())
    base_median = statistics.median(times["base"])
    result = {
        "batch_size": batch_size,
        "image_size": size,
        "rounds": rounds,
        "warmup_calls_each": warmup,
        "adapter_classes": n_classes,
        "times": {name: summary(values) for name, values in times.items()},
        "sanity": sanity,
        "speed_probe_s_before_after": probes,
    }
    for name in ("unmerged", "merged"):
        result[f"ratio_of_medians_{name}"] = statistics.median(times[name]) / base_median
        result[f"median_of_round_ratios_{name}"] = statistics.median(
            t / b for t, b in zip(times[name], times["base"], strict=True)
        )
    del unmerged, merged, models
    gc.collect()
    progress.update(1)
    return result


# ------------------------------------------------------------------------------------------------- 4. peak memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # KiB on Linux, bytes on macOS


def _rss_record() -> dict:
    return {
        "maxrss_mib": _maxrss_mib(),
        "vmhwm_mib": (_proc_status_kib("VmHWM") or 0) / 1024 or None,
        "vmrss_mib": (_proc_status_kib("VmRSS") or 0) / 1024 or None,
    }


def memory_worker(args) -> None:
    """Runs in a fresh process: build one model, then one edit; print the RSS figures as one JSON line.

    Caveat handled here: on Linux, ``exec`` folds the *parent's* peak RSS into the child's ``ru_maxrss`` (the
    child's ``signal->maxrss`` takes the hiwater mark of the address space it replaces), so ``ru_maxrss`` of a
    subprocess is at least the parent's peak at spawn time. The benchmark therefore spawns every memory worker
    before the parent builds any model, and also records ``VmHWM`` from ``/proc/self/status``, the peak RSS of this
    process's own address space, which does not inherit anything.
    """
    from hf_clip_forget import add_forget_adapter

    at_start = _rss_record()  # after importing torch, transformers, peft and hf_clip_forget
    model = build_model(args.model)
    tokenizer = build_tokenizer()
    gc.collect()
    after_load = _rss_record()
    # Linux >= 4.0: writing "5" to clear_refs resets VmHWM to the current RSS, so the VmHWM read after the build is
    # the peak of the build itself, even when loading peaked higher than the RSS it settled at.
    hwm_reset = False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        hwm_reset = True
    except OSError:
        pass
    classes = FORGET_CLASSES[: args.n_classes]
    with quiet():
        seconds, peft_model = timed(
            add_forget_adapter, model, classes, tokenizer=tokenizer, templates=args.templates, show_progress=False
        )
    after_build = _rss_record()
    record = {
        "model": args.model,
        "templates": args.templates,
        "n_classes": args.n_classes,
        "n_prompts": args.n_classes * n_templates(args.templates),
        "at_start": at_start,
        "after_load": after_load,
        "after_build": after_build,
        "vmhwm_reset_before_build": hwm_reset,
        "maxrss_after_load_mib": after_load["maxrss_mib"],
        "maxrss_after_build_mib": after_build["maxrss_mib"],
        "maxrss_increase_mib": after_build["maxrss_mib"] - after_load["maxrss_mib"],
        # with the reset, VmHWM after the build is the build's own peak; minus the RSS it started from
        "build_peak_above_rss_at_start_mib": (
            after_build["vmhwm_mib"] - after_load["vmrss_mib"] if hwm_reset and after_build["vmhwm_mib"] else None
        ),
        "add_forget_adapter_s": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    del peft_model
    print("MEMORY_RESULT " + json.dumps(record), flush=True)


def bench_memory(key, configs, progress):
    rows = []
    for template_set, n_classes in configs:
        progress.set_postfix_str(f"memory worker {n_classes}x{n_templates(template_set)}")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-worker",
            "--model",
            key,
            "--n-classes",
            str(n_classes),
            "--templates",
            template_set,
        ]
        parent_peak = _maxrss_mib()
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("MEMORY_RESULT ")]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"memory worker failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        row = json.loads(lines[-1].removeprefix("MEMORY_RESULT "))
        row["parent_maxrss_at_spawn_mib"] = parent_peak
        # ru_maxrss is trustworthy only if the worker's own load peak exceeds what it inherited from this process
        row["maxrss_inherited_from_parent"] = row["after_load"]["maxrss_mib"] <= parent_peak + 1
        rows.append(row)
        progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------------------------- tables
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def format_tables(results: dict) -> str:
    out = []
    machine = results["machine"]
    out.append("Machine: {cpu_count} CPUs ({cpus_usable} usable), {cpu_model}, {memory_gib} GiB RAM".format(**machine))
    out.append(
        "         torch {torch} ({torch_threads} threads), transformers {transformers}, peft {peft}, "
        "Python {python}, {platform}".format(**machine)
    )
    for key, model_results in results["models"].items():
        name = MODEL_SPECS[key]["name"]
        out.append("")
        details = "random weights, real shapes"
        if "n_parameters" in model_results:
            details += (
                f"; {model_results['n_parameters'] / 1e6:.1f} M parameters; built in {model_results['build_s']:.1f} s"
            )
        out.append(f"=== {name} ({details}) ===")
        if "edit" in model_results:
            out.append("")
            out.append(
                "Building an edit: median (min) of n runs; encode and add_forget_adapter in s, solves in ms.\n"
                "probe: seconds of a fixed 4x1024^3 matmul timed just before the row (machine speed at the time)."
            )
            header = (
                f"{'templates':<9} {'classes':>7} {'prompts':>7} | {'encode s':>17} {'n':>2} | "
                f"{'nullspace ms':>12} {'ccup ms':>8} {'(1 thread)':>16} | {'add_forget_adapter s':>20} {'n':>2} | "
                f"{'probe s':>7}"
            )
            out.append(header)
            out.append("-" * len(header))
            for row in model_results["edit"]:
                encode, total = row["encode"], row["add_forget_adapter"]
                encode_text = f"{encode['median_s']:.3f} ({encode['min_s']:.3f})"
                total_text = f"{total['median_s']:.3f} ({total['min_s']:.3f})"
                out.append(
                    f"{row['templates']:<9} {row['n_classes']:>7} {row['n_prompts']:>7} | "
                    f"{encode_text:>17} {encode['n']:>2} | "
                    f"{_ms(row['solve_nullspace']['median_s']):>12} {_ms(row['solve_ccup']['median_s']):>8} "
                    f"{_ms(row['solve_nullspace_1_thread']['median_s']):>7} / {_ms(row['solve_ccup_1_thread']['median_s']):>6} | "
                    f"{total_text:>20} {total['n']:>2} | {row['speed_probe_s']:>7.3f}"
                )
            out.append(
                f"(solves: median of {model_results['edit'][0]['solve_nullspace']['n']}; "
                "ccup uses a retain set of 10 class embeddings; '1 thread': the same two solves under "
                "torch.set_num_threads(1), nullspace / ccup)"
            )
        if "merge" in model_results:
            out.append("")
            out.append(
                "Merge / unmerge of visual_projection (ms; median over cycles after the first merge, which also\n"
                "composes the edit M); '1 thread': the same again under torch.set_num_threads(1)"
            )
            header = (
                f"{'method':<9} {'classes':>7} {'rank':>8} | {'first merge':>11} {'merge':>7} {'unmerge':>7} | "
                f"{'first (1 thr)':>13} {'merge':>7} {'unmerge':>7} | {'cycles':>6} | {'bit-exact':>9}"
            )
            out.append(header)
            out.append("-" * len(header))
            for row in model_results["merge"]:
                rank = "/".join(str(r) for r in row["rank"])
                out.append(
                    f"{row['method']:<9} {row['n_classes']:>7} {rank:>8} | {_ms(row['first_merge_s']):>11} "
                    f"{_ms(row['merge']['median_s']):>7} {_ms(row['unmerge']['median_s']):>7} | "
                    f"{_ms(row['first_merge_1_thread_s']):>13} {_ms(row['merge_1_thread']['median_s']):>7} "
                    f"{_ms(row['unmerge_1_thread']['median_s']):>7} | {row['merge']['n']:>6} | "
                    f"{str(row['round_trip_bit_exact']):>9}"
                )
        if "image" in model_results:
            img = model_results["image"]
            out.append("")
            out.append(
                f"get_image_features, batch {img['batch_size']} x {img['image_size']}x{img['image_size']}, "
                f"{img['rounds']} interleaved rounds (rotating order), adapter of {img['adapter_classes']} classes"
            )
            header = (
                f"{'model':<9} | {'median s':>9} {'min s':>8} {'max s':>8} | {'ratio of medians':>16} "
                f"{'median of per-round ratios':>26}"
            )
            out.append(header)
            out.append("-" * len(header))
            for name in ("base", "unmerged", "merged"):
                t = img["times"][name]
                ratio = 1.0 if name == "base" else img[f"ratio_of_medians_{name}"]
                paired = 1.0 if name == "base" else img[f"median_of_round_ratios_{name}"]
                out.append(
                    f"{name:<9} | {t['median_s']:>9.4f} {t['min_s']:>8.4f} {t['max_s']:>8.4f} | "
                    f"{ratio:>15.3f}x {paired:>25.3f}x"
                )
            probes = img["speed_probe_s_before_after"]
            out.append(f"(probe before / after the rounds: {probes[0]:.3f} s / {probes[1]:.3f} s)")
            s = img["sanity"]
            out.append(
                f"(max |merged - unmerged| = {s['max_abs_diff_merged_vs_unmerged']:.2e}; "
                f"max |edited - base| = {s['max_abs_diff_edited_vs_base']:.2e})"
            )
        if "memory" in model_results:
            out.append("")
            out.append(
                "Peak RSS around add_forget_adapter (nullspace), one fresh process per configuration (MiB).\n"
                "ru_maxrss: process peak after loading the model / after building the edit, and the increase.\n"
                "VmHWM after load: peak of the process's own address space; RSS at build start: VmRSS before the build;\n"
                "build peak: VmHWM (reset to the current RSS just before the build) minus RSS at build start."
            )
            header = (
                f"{'templates':<9} {'classes':>7} {'prompts':>7} | {'ru_maxrss load':>14} {'ru_maxrss edit':>14} "
                f"{'increase':>8} | {'VmHWM load':>10} {'RSS at start':>12} {'build peak':>10} | {'build s':>7}"
            )
            out.append(header)
            out.append("-" * len(header))
            for row in model_results["memory"]:
                above = row["build_peak_above_rss_at_start_mib"]
                flag = " (inherited!)" if row.get("maxrss_inherited_from_parent") else ""
                out.append(
                    f"{row['templates']:<9} {row['n_classes']:>7} {row['n_prompts']:>7} | "
                    f"{row['maxrss_after_load_mib']:>14.1f} {row['maxrss_after_build_mib']:>14.1f} "
                    f"{row['maxrss_increase_mib']:>8.1f} | {row['after_load']['vmhwm_mib']:>10.1f} "
                    f"{row['after_load']['vmrss_mib']:>12.1f} {('n/a' if above is None else f'+{above:.1f}'):>10} | "
                    f"{row['add_forget_adapter_s']:>7.2f}{flag}"
                )
    out.append("")
    out.append(f"Total wall time of the benchmark: {results['total_wall_s']:.0f} s")
    cpu = results.get("cpu_seconds_over_run")
    if cpu:
        out.append(
            "CPU time over the run (all CPUs, from /proc/stat): user {user:.0f} s, system {system:.0f} s, "
            "idle {idle:.0f} s, steal {steal:.0f} s; of the busy time, this benchmark {this_benchmark:.0f} s and "
            "other processes {other_processes:.0f} s".format(**cpu)
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default="b32,l14", help="comma-separated subset of: b32, l14 (default: both)")
    parser.add_argument(
        "--quick", action="store_true", help="ViT-B/32 only, fewer repeats, no 100 classes x 80 templates"
    )
    parser.add_argument("--json", metavar="OUT", help="write every number (with the raw samples) to this JSON file")
    parser.add_argument(
        "--sections", default="edit,merge,image,memory", help="comma-separated subset of: edit, merge, image, memory"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats of encode / add_forget_adapter (default 3)")
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats of 100 classes x 80 templates (1)")
    parser.add_argument("--solve-repeats", type=int, default=None, help="repeats of each solve (default 20)")
    parser.add_argument("--merge-cycles", type=int, default=None, help="merge/unmerge cycles (default 20)")
    parser.add_argument("--image-batch", type=int, default=None, help="image batch (default: 8 for b32, 2 for l14)")
    parser.add_argument("--image-rounds", type=int, default=None, help="interleaved rounds (default: 30 b32, 10 l14)")
    parser.add_argument("--image-warmup", type=int, default=2, help="warm-up calls per model before timing (2)")
    parser.add_argument("--image-classes", type=int, default=10, choices=CLASS_COUNTS, help="classes of the adapter")
    parser.add_argument(
        "--large-models",
        default="b32",
        help="models on which 100 classes x 80 templates is measured (default: b32; 'all' or 'none'); --quick: none",
    )
    # internal: one memory measurement in a fresh process
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(MODEL_SPECS), help=argparse.SUPPRESS)
    parser.add_argument("--n-classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--templates", choices=TEMPLATE_SETS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        return args
    if args.quick:
        args.models = "b32" if args.models == parser.get_default("models") else args.models
        args.large_models = "none"
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.solve_repeats = args.solve_repeats or (5 if args.quick else 20)
    args.merge_cycles = args.merge_cycles or (5 if args.quick else 20)
    args.model_keys = [m.strip() for m in args.models.split(",") if m.strip()]
    large = {"all": ",".join(MODEL_SPECS), "none": ""}.get(args.large_models, args.large_models)
    args.large_model_keys = [m.strip() for m in large.split(",") if m.strip()]
    unknown = [m for m in args.model_keys + args.large_model_keys if m not in MODEL_SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODEL_SPECS)}")
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.section_list if s not in ("edit", "merge", "image", "memory")]
    if bad:
        parser.error(f"unknown section(s) {bad}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}

    import hf_clip_forget  # noqa: F401  (registers the peft method)
    from hf_clip_forget import add_forget_adapter
    from hf_clip_forget.core import class_text_embeddings, resolve_templates
    from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

    start = time.perf_counter()
    stat_start = cpu_stat()
    own_start = _own_cpu_seconds()
    all_configs = [(t, n) for t in TEMPLATE_SETS for n in CLASS_COUNTS]

    def configs_for(key):
        return [c for c in all_configs if c != LARGE_CONFIG or key in args.large_model_keys]

    results = {
        "machine": machine_info(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("memory") and k not in ("model",)},
        "models": {},
    }
    tokenizer = build_tokenizer()
    results["parent_maxrss_before_models_mib"] = _maxrss_mib()
    # warm peft's wrapping code paths once on a tiny model, so the first timed call does not pay for them
    with quiet():
        add_forget_adapter(tiny_clip(), ["cat"], tokenizer=tiny_tokenizer(), templates="single", show_progress=False)

    sections = args.section_list
    results["models"] = {key: {} for key in args.model_keys}
    if "memory" in sections:
        # first, while this process is still small: a child's ru_maxrss starts from its parent's peak (see
        # memory_worker), so the workers are spawned before the parent builds any model
        for key in args.model_keys:
            configs = configs_for(key)
            with tqdm(total=len(configs), desc=f"{MODEL_SPECS[key]['name']} memory", file=sys.stderr) as progress:
                results["models"][key]["memory"] = bench_memory(key, configs, progress)
    for key in args.model_keys:
        name = MODEL_SPECS[key]["name"]
        configs = configs_for(key)
        batch, rounds = IMAGE_DEFAULTS[key]
        batch, rounds = args.image_batch or batch, args.image_rounds or rounds
        if args.quick and not args.image_rounds:
            rounds = min(rounds, 10)
        steps = (
            ("edit" in sections) * len(configs)
            + ("merge" in sections) * (len(MERGE_RANKS) + 1)
            + ("image" in sections)
        )
        if not steps:
            continue
        model_results = {}
        with tqdm(total=steps, desc=name, file=sys.stderr, dynamic_ncols=True) as progress:
            progress.set_postfix_str("building model")
            build_s, model = timed(build_model, key)
            model_results["build_s"] = build_s
            model_results["n_parameters"] = sum(p.numel() for p in model.parameters())
            model_results["config"] = {
                "text": dict(COMMON_TEXT, **MODEL_SPECS[key]["text"]),
                "vision": dict(COMMON_VISION, **MODEL_SPECS[key]["vision"]),
                "projection_dim": MODEL_SPECS[key]["projection_dim"],
            }
            with torch.no_grad():  # warm up the text tower's kernels
                class_text_embeddings(
                    model, tokenizer, FORGET_CLASSES[:1], resolve_templates("single"), True, 256, False
                )

            embeddings = {}
            if "edit" in sections:
                rows, embeddings = bench_edit(
                    model,
                    tokenizer,
                    configs,
                    args.repeats,
                    args.large_repeats,
                    args.solve_repeats,
                    progress,
                )
                model_results["edit"] = rows
            needed = set(MERGE_RANKS) | {args.image_classes}
            if ("merge" in sections or "image" in sections) and not needed <= set(embeddings):
                progress.set_postfix_str("embedding classes for merge/image")
                with torch.no_grad():
                    single = resolve_templates("single")
                    for k in needed - set(embeddings):
                        embeddings[k] = class_text_embeddings(
                            model, tokenizer, FORGET_CLASSES[:k], single, True, 256, False
                        ).embeddings
                    embeddings[("retain", "single")] = class_text_embeddings(
                        model, tokenizer, RETAIN_CLASSES, single, True, 256, False
                    ).embeddings
            if "merge" in sections:
                model_results["merge"] = bench_merge(model, embeddings, args.merge_cycles, progress)
            if "image" in sections:
                model_results["image"] = bench_image(
                    model,
                    embeddings[args.image_classes],
                    args.image_classes,
                    batch,
                    rounds,
                    args.image_warmup,
                    progress,
                )
            del model, embeddings
            gc.collect()
        results["models"][key].update(model_results)

    results["total_wall_s"] = time.perf_counter() - start
    stat_end = cpu_stat()
    if stat_start and stat_end:
        delta = {k: stat_end[k] - stat_start[k] for k in stat_start}
        ticks = os.sysconf("SC_CLK_TCK")
        results["cpu_seconds_over_run"] = {k: v / ticks for k, v in delta.items()}
        own = _own_cpu_seconds() - own_start
        busy = (delta["user"] + delta["nice"] + delta["system"]) / ticks
        results["cpu_seconds_over_run"]["this_benchmark"] = own
        # CPU time that other processes on the machine used meanwhile (they compete for the same cores)
        results["cpu_seconds_over_run"]["other_processes"] = max(0.0, busy - own)
    print(format_tables(results), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        print(f"Wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
