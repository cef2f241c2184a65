#!/usr/bin/env python
"""Benchmark the prompt-embedding cache (``hf_clip_forget.core.prompt_cache``) on the demo model.

The edit: ``add_forget_adapter(model, ["cat"], processor.tokenizer, retain_classes=<the 9 other CIFAR-10 classes>,
templates="imagenet", show_progress=False)`` with the 80 templates pinned (not the library's default for an edit that
names its retain classes, which is 7), i.e. 800 prompts, on ``load_demo_model()``. Conditions, timed
with ``time.perf_counter`` in interleaved rounds (so that a slow phase of a shared machine hits all alike):

* ``uncached`` — ``use_cache=False``: every prompt through the text tower, as before the cache;
* ``cold`` — the cache empty on disk and in memory, and nothing memoised (tensor hashes, text path, tokenizer key):
  a first edit, paying the encoding, the fingerprint of the text tower and the write;
* ``warm_memory`` — the same edit again in the same process;
* ``warm_disk`` — the memory cache emptied (hashes still memoised): the rows read from the file;
* ``solve_alone`` — ``add_forget_adapter(model, ["cat"], text_embeds=..., retain_text_embeds=...)`` with the
  embeddings given (the same 80 templates, computed once beforehand): the build without any prompt encoding, the
  issue's reference;
* ``factors_alone`` — ``build_edit_factors("nullspace", forget, retain, keep_shared_direction=True)`` only;
* ``tokenizer_check`` — ``check_tokenizer_matches_model(model, tokenizer, explicit=True)`` alone, which every build
  from class names with an explicit tokenizer runs (it loads the checkpoint's own tokenizer to compare);
* ``warm_memory_tokenizer_loaded_once`` — ``warm_memory`` with that checkpoint tokenizer loaded once and reused
  (``tokenizer_checks._checkpoint_tokenizer`` memoised for the call): what a warm edit would cost if the library
  kept it;
* ``new_process_first`` / ``new_process_second`` — a new process (this script in ``--worker`` mode, same cache
  folder) loads the model and times its first build (text path recorded, hashes computed, file read) and a second.

After each build the adapter is unloaded (``unload()``, not timed), so that every build starts from the same plain
model. The cache lives in a temporary folder (``--cache-home``), never in the user's ``$HF_HOME``.

Usage::

    python scripts/benchmark_prompt_cache.py --rounds 7 --processes 3 --json prompt_cache.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FORGET = ["cat"]
RETAIN = [name for name in CIFAR10 if name not in FORGET]
#: Pinned in every build and in ``solve_alone``'s embeddings: the measured edit encodes 800 prompts whatever the
#: library's default for an edit naming its retain classes is.
TEMPLATES = "imagenet"


def load(cache_home: str):
    """The demo model and tokenizer (loaded from the usual ``$HF_HOME``), then the cache pointed at ``cache_home``."""
    from hf_clip_forget.models.demo import load_demo_model

    model, processor = load_demo_model()
    os.environ["HF_HOME"] = cache_home  # read by the prompt cache at each call
    return model.eval(), processor.tokenizer


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def build(model, tokenizer, **options):
    from hf_clip_forget import add_forget_adapter

    seconds, edited = timed(
        lambda: add_forget_adapter(model, FORGET, tokenizer, templates=TEMPLATES, show_progress=False, **options)
    )
    factor = edited.base_model.forget_layers()["visual_projection"].projection_edit_forget["default"].clone()
    edited.unload()
    return seconds, factor


@contextlib.contextmanager
def checkpoint_tokenizer_loaded_once():
    """Within this context the tokenizer check reuses the checkpoint tokenizer it loaded first."""
    from hf_clip_forget.core import tokenizer_checks

    load, loaded = tokenizer_checks._checkpoint_tokenizer, {}

    def once(model):
        key = getattr(model, "name_or_path", None)
        if key not in loaded:
            loaded[key] = load(model)
        return loaded[key]

    tokenizer_checks._checkpoint_tokenizer = once
    try:
        yield
    finally:
        tokenizer_checks._checkpoint_tokenizer = load


def forget_everything() -> None:
    """Empty the cache on disk and in memory, and every in-process memo: the state of a first run."""
    from hf_clip_forget.core import prompt_cache, text_path

    prompt_cache.clear_prompt_cache()
    prompt_cache._TOKENIZER_KEYS.clear()
    text_path._DIGESTS.clear()
    text_path._PATHS.clear()


def worker(cache_home: str) -> None:
    model, tokenizer = load(cache_home)
    first, _ = build(model, tokenizer, retain_classes=RETAIN)
    second, _ = build(model, tokenizer, retain_classes=RETAIN)
    print(json.dumps({"new_process_first": first, "new_process_second": second}))


def run_worker(cache_home: str, threads: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--worker", "--cache-home", cache_home, *threads],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def rounds(model, tokenizer, cache_home: str, count: int, processes: int) -> tuple[dict[str, list[float]], dict]:
    import torch

    from hf_clip_forget import add_forget_adapter
    from hf_clip_forget.core import build_edit_factors, class_text_embeddings, prompt_cache, resolve_templates
    from hf_clip_forget.core.tokenizer_checks import check_tokenizer_matches_model

    def embed(names):
        return class_text_embeddings(
            model, tokenizer, names, resolve_templates(TEMPLATES), show_progress=False
        ).embeddings

    forget_emb, retain_emb = embed(FORGET), embed(RETAIN)
    times: dict[str, list[float]] = {}
    factors: dict[str, object] = {}
    loads = []

    def record(name: str, seconds: float, factor=None) -> None:
        times.setdefault(name, []).append(seconds)
        if factor is not None:
            factors.setdefault(name, factor)

    def solve_alone():
        edited = add_forget_adapter(
            model, FORGET, text_embeds=forget_emb, retain_text_embeds=retain_emb, show_progress=False
        )
        factor = edited.base_model.forget_layers()["visual_projection"].projection_edit_forget["default"].clone()
        edited.unload()
        return factor

    for index in range(count):
        loads.append(os.getloadavg()[0])
        record("uncached", *build(model, tokenizer, retain_classes=RETAIN, use_cache=False))
        forget_everything()
        record("cold", *build(model, tokenizer, retain_classes=RETAIN))
        record("warm_memory", *build(model, tokenizer, retain_classes=RETAIN))
        prompt_cache._MEMORY.clear()
        record("warm_disk", *build(model, tokenizer, retain_classes=RETAIN))
        record("warm_memory", *build(model, tokenizer, retain_classes=RETAIN))
        with checkpoint_tokenizer_loaded_once():
            build(model, tokenizer, retain_classes=RETAIN)
            record("warm_memory_tokenizer_loaded_once", *build(model, tokenizer, retain_classes=RETAIN))
        seconds, factor = timed(solve_alone)
        record("solve_alone", seconds, factor)
        record(
            "factors_alone",
            timed(lambda: build_edit_factors("nullspace", forget_emb, retain_emb, keep_shared_direction=True))[0],
        )
        record("tokenizer_check", timed(lambda: check_tokenizer_matches_model(model, tokenizer, explicit=True))[0])
        if index < processes:
            threads = [f"--threads={torch.get_num_threads()}"]
            for name, seconds in run_worker(cache_home, threads).items():
                record(name, seconds)
        print(f"round {index + 1}/{count} done (load average {loads[-1]:.2f})", file=sys.stderr)
    reference = factors["uncached"]
    agreement = {name: float((factor - reference).abs().max()) for name, factor in factors.items()}
    return times, {"load_average": loads, "max_abs_factor_difference_vs_uncached": agreement}


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "runs": len(values)}
        for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of every in-process condition")
    parser.add_argument("--processes", type=int, default=3, help="rounds that also time a new process")
    parser.add_argument("--cache-home", default=None, help="HF_HOME of the cache (default: a new temporary folder)")
    parser.add_argument("--json", default=None, help="write the timings here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    cache_home = args.cache_home or tempfile.mkdtemp(prefix="prompt_cache_benchmark_")
    if args.worker:
        worker(cache_home)
        return
    model, tokenizer = load(cache_home)
    times, checks = rounds(model, tokenizer, cache_home, args.rounds, args.processes)
    stats = summary(times)
    solve = stats["solve_alone"]["median_s"]
    ratios = {name: values["median_s"] / solve for name, values in stats.items()}
    print(f"\n{'condition':<36}{'median s':>10}{'min s':>10}{'runs':>6}{'× solve':>10}")
    for name, values in stats.items():
        print(f"{name:<36}{values['median_s']:>10.3f}{values['min_s']:>10.3f}{values['runs']:>6}{ratios[name]:>10.2f}")
    print(f"\nload average per round: {[round(x, 2) for x in checks['load_average']]}")
    print(f"max |Δ forget factor| vs uncached: {checks['max_abs_factor_difference_vs_uncached']}")
    if args.json:
        import torch

        from hf_clip_forget.core import resolve_templates

        templates = f"{TEMPLATES} ({len(resolve_templates(TEMPLATES))})"
        report = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "edit": {"forget": FORGET, "retain": RETAIN, "templates": templates},
            "timings": stats,
            "ratio_to_solve_alone": ratios,
            **checks,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
