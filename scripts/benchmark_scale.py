"""Label-set scale (issue 24): a forget edit from 1 to 20,000 retain names and from 80 to 240,000 prompts, against
its limits, on the demo model, in one process.

Class names are the demo tokenizer's vocabulary words (``vocabulary_words``): the first 10 are forgotten, the next
``N`` are the retain names. Per size, timed with ``time.perf_counter`` (median of ``--repeats``):

* ``bare`` — the limit of a cold edit: the tokenizer and ``get_text_features`` over the same prompts in length-sorted
  batches of 256, nothing else;
* ``cold`` — ``add_forget_adapter(model, forget, tokenizer, retain_classes=retain, templates=T)`` with the prompt
  cache off (every prompt through the text tower);
* ``warm`` — the same call again with the prompt cache warm (filled once before, in memory);
* ``solve`` — the same call with ``text_embeds`` / ``retain_text_embeds`` given (the embeddings computed once
  before): the build without any prompt handling, the reference of the warm goal;
* the warm repeat's own steps, from one profiled repeat (``cProfile``, cumulative seconds): name validation
  (``validate_class_names``), the tokenizer checks (``warn_about_poorly_tokenized_classes``, ``unknown_class_names``,
  ``check_tokenizer_matches_model``) and the cache lookups (``cached_embeddings``), as shares of the profiled call
  (the profiler slows Python-heavy steps more than tensor work, so a share against the unprofiled time would
  overstate them).

Goals (issue 24): cold ≤ 1.1× bare at 20,000 names; warm ≤ 1.5× solve; validation + tokenizer checks + cache
lookups ≤ 5 % of warm at 20,000 names; every non-encoding step's time at 20,000 names ≤ 2.2× its time at 10,000.

Prompt scale (``--prompt-names``, 80 templates each: 80 to 240,000 prompts): cold vs bare, and the peak resident
memory of a cold build in a fresh process (``--worker``) above the loaded model, against the bound the issue sets:
the prompts' embeddings (``prompts × d`` float32, kept twice: the tower's output and the normalised copy) plus one
batch of the text tower's activations.

    python scripts/benchmark_scale.py --json docs/scale.json

The prompt cache lives in a temporary folder (never the user's ``$HF_HOME``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch


SINGLE = ["a photo of a {}."]
STEP_FUNCTIONS = {
    "validation": ("validate_class_names",),
    "tokenizer checks": (
        "warn_about_poorly_tokenized_classes",
        "unknown_class_names",
        "check_tokenizer_matches_model",
    ),
    "cache lookups": ("cached_embeddings",),
}


def timed(function, *args, **options) -> float:
    started = time.perf_counter()
    function(*args, **options)
    return time.perf_counter() - started


def bare_pass(model, tokenizer, prompts: list[str], batch_size: int = 256) -> None:
    """The tokenizer and ``get_text_features`` over length-sorted batches: the least a cold edit must do."""
    from hf_clip_forget.core.text_embeddings import _length_sorted_batches, _Tokenization

    tokenize = _Tokenization.of(model, tokenizer)
    with torch.inference_mode():
        for batch in _length_sorted_batches(tokenize, prompts, batch_size):
            model.get_text_features(**tokenize([prompts[i] for i in batch]))


def build(model, tokenizer, forget, retain, templates, **options) -> None:
    from hf_clip_forget import add_forget_adapter

    edited = add_forget_adapter(model, forget, tokenizer, retain_classes=retain, templates=templates,
                                show_progress=False, **options)  # fmt: skip
    edited.unload()


def steps_of(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each step's functions in a profiled call of :func:`build` (a function counted once per
    step), and ``"profiled total"``, the call's own cumulative seconds under the profiler (which slows Python-heavy
    steps more than tensor work: shares are taken within the profile)."""
    stats = pstats.Stats(profile).stats
    found = {}
    for step, names in STEP_FUNCTIONS.items():
        found[step] = sum(entry[3] for (_, _, function), entry in stats.items() if function in names)
    found["profiled total"] = max(entry[3] for (_, _, function), entry in stats.items() if function == "build")
    return found


def names_scale(model, tokenizer, sizes: list[int], repeats: int) -> list[dict]:
    from hf_clip_forget.core import encode_prompts, vocabulary_words
    from hf_clip_forget.core.prompt_cache import prompt_cache_disabled

    words = vocabulary_words(tokenizer, max(sizes) + 10)
    forget, rows = words[:10], []
    for size in sizes:
        retain = words[10 : 10 + size]
        prompts = [SINGLE[0].format(name) for name in forget + retain]
        with prompt_cache_disabled():
            text = encode_prompts(model, tokenizer, prompts[:10], show_progress=False)
            retain_text = encode_prompts(model, tokenizer, prompts[10:], show_progress=False)
        build(model, tokenizer, forget, retain, SINGLE)  # fills the prompt cache (in memory)
        times = {"bare": [], "cold": [], "warm": [], "solve": []}
        for _ in range(repeats):
            times["bare"].append(timed(bare_pass, model, tokenizer, prompts))
            with prompt_cache_disabled():
                times["cold"].append(timed(build, model, tokenizer, forget, retain, SINGLE))
            times["warm"].append(timed(build, model, tokenizer, forget, retain, SINGLE))
            times["solve"].append(timed(build, model, None, None, None, None, text_embeds=text,
                                        retain_text_embeds=retain_text))  # fmt: skip
        profile = cProfile.Profile()
        profile.runcall(build, model, tokenizer, forget, retain, SINGLE)
        median = {name: statistics.median(values) for name, values in times.items()}
        steps = steps_of(profile)
        row = {"retain_names": size, "prompts": len(prompts), "seconds": median, "steps_profiled": steps,
               "cold_over_bare": median["cold"] / median["bare"], "warm_over_solve": median["warm"] / median["solve"],
               "checks_share_of_warm": sum(steps[step] for step in STEP_FUNCTIONS) / steps["profiled total"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def linearity(rows: list[dict], small: int, large: int) -> dict[str, float] | None:
    """Time at ``large`` names over time at ``small`` names, per non-encoding step."""
    by_size = {row["retain_names"]: row for row in rows}
    if small not in by_size or large not in by_size:
        return None
    a, b = by_size[small], by_size[large]
    ratios = {step: b["steps_profiled"][step] / a["steps_profiled"][step] for step in b["steps_profiled"]}
    ratios.update({name: b["seconds"][name] / a["seconds"][name] for name in ("warm", "solve")})
    return ratios


def worker(names: int) -> None:
    """A fresh process: peak resident memory of one cold build with ``names`` × 80 prompts, above the loaded model."""
    import threading

    from hf_clip_forget.cli import load_dual_encoder
    from hf_clip_forget.core import IMAGENET_TEMPLATES, vocabulary_words
    from hf_clip_forget.core.prompt_cache import prompt_cache_disabled

    def rss() -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))

    model, tokenizer, _ = load_dual_encoder("demo", image_processor=False)
    words = vocabulary_words(tokenizer, names)
    loaded, peak, done = rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        with prompt_cache_disabled():
            seconds = timed(build, model, tokenizer, words[:1], words[1:] or None, list(IMAGENET_TEMPLATES))
    finally:
        done.set()
        thread.join()
    dim = model.config.projection_dim
    print(json.dumps({"names": names, "prompts": names * len(IMAGENET_TEMPLATES), "seconds": seconds,
                      "loaded_rss": loaded, "peak_rss": peak[0], "dim": dim}))  # fmt: skip


def prompts_scale(model, tokenizer, names_list: list[int]) -> list[dict]:
    from hf_clip_forget.core import IMAGENET_TEMPLATES, vocabulary_words

    rows = []
    for names in names_list:
        words = vocabulary_words(tokenizer, names)
        prompts = [template.format(word) for word in words for template in IMAGENET_TEMPLATES]
        bare = timed(bare_pass, model, tokenizer, prompts)
        child = subprocess.run([sys.executable, __file__, "--worker", str(names)], check=True, capture_output=True,
                               text=True, env=os.environ)  # fmt: skip
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        width = model.config.text_config.hidden_size
        batch_activations = 256 * model.config.text_config.max_position_embeddings * width * 4 * 8
        bound = 2 * measured["prompts"] * measured["dim"] * 4 + batch_activations
        row = {**measured, "bare_seconds": bare, "cold_over_bare": measured["seconds"] / bare,
               "run_bytes": measured["peak_rss"] - measured["loaded_rss"], "bound_bytes": bound,
               "bytes_per_prompt": (measured["peak_rss"] - measured["loaded_rss"]) / measured["prompts"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default="1,10,100,1000,10000,20000", help="retain-name counts")
    parser.add_argument("--prompt-names", default="1,10,100,1000,3000", help="names × 80 templates (prompt scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    os.environ["HF_HOME"] = os.environ.get("HF_CLIP_FORGET_SCALE_HOME") or tempfile.mkdtemp(
        prefix="hf_clip_forget-scale-"
    )
    if args.worker is not None:
        worker(args.worker)
        return
    from hf_clip_forget.cli import load_dual_encoder

    started = time.perf_counter()
    model, tokenizer, _ = load_dual_encoder("demo", image_processor=False)
    names = names_scale(model, tokenizer, [int(n) for n in args.names.split(",") if n], args.repeats)
    prompts = prompts_scale(model, tokenizer, [int(n) for n in args.prompt_names.split(",") if n])
    result = {
        "command": "python scripts/benchmark_scale.py " + " ".join(sys.argv[1:]),
        "names": names, "linear_20000_over_10000": linearity(names, 10000, 20000), "prompts": prompts,
        "seconds": time.perf_counter() - started, "torch": torch.__version__, "load_average": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
