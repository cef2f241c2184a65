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
* the warm repeat's own steps, each timed alone as the build calls it (median): name validation
  (``validate_class_names``), the tokenizer checks (``check_tokenizer_matches_model``,
  ``warn_about_poorly_tokenized_classes``) and the cache lookups (``encode_prompts`` of the cached prompts).

The cold edit and the bare pass are interleaved first; then, once the cache is filled, the warm repeat and the solve
(at least 5 rounds): a repeated edit follows the same edit, not a cold one.

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
import json
import os
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


def step_times(model, tokenizer, forget: list[str], retain: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of the warm repeat's own steps, each called as the build calls it, on the same names (warm:
    the build ran before): name validation, the tokenizer checks, and the prompt-cache lookup (``encode_prompts``
    of the prompts, all cached: key, lookup, rows back as one tensor)."""
    from hf_clip_forget.core import encode_prompts
    from hf_clip_forget.core.text_embeddings import validate_class_names
    from hf_clip_forget.core.tokenizer_checks import check_tokenizer_matches_model, warn_about_poorly_tokenized_classes

    prompts = [SINGLE[0].format(name) for name in forget + retain]
    steps = {
        "validation": lambda: (validate_class_names(forget), validate_class_names(retain, "retain_classes")),
        "tokenizer checks": lambda: (check_tokenizer_matches_model(model, tokenizer),
                                     warn_about_poorly_tokenized_classes(tokenizer, forget + retain, SINGLE)),
        "cache lookups": lambda: encode_prompts(model, tokenizer, prompts, show_progress=False),
    }  # fmt: skip
    return {name: statistics.median(timed(step) for _ in range(max(repeats, 5))) for name, step in steps.items()}


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
        times = {"bare": [], "cold": [], "warm": [], "solve": []}
        for _ in range(repeats):  # the cold edit against its limit, interleaved
            times["bare"].append(timed(bare_pass, model, tokenizer, prompts))
            with prompt_cache_disabled():
                times["cold"].append(timed(build, model, tokenizer, forget, retain, SINGLE))
        build(model, tokenizer, forget, retain, SINGLE)  # fills the prompt cache (in memory)
        for _ in range(max(repeats, 5)):  # a repeated edit against the solve alone, interleaved
            times["warm"].append(timed(build, model, tokenizer, forget, retain, SINGLE))
            times["solve"].append(timed(build, model, None, None, None, None, text_embeds=text,
                                        retain_text_embeds=retain_text))  # fmt: skip
        median = {name: statistics.median(values) for name, values in times.items()}
        steps = step_times(model, tokenizer, forget, retain, repeats)
        row = {"retain_names": size, "prompts": len(prompts), "seconds": median, "all_seconds": times,
               "steps": steps, "cold_over_bare": median["cold"] / median["bare"],
               "warm_over_solve": median["warm"] / median["solve"],
               "checks_share_of_warm": sum(steps.values()) / median["warm"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def linearity(rows: list[dict], small: int, large: int) -> dict[str, float] | None:
    """Time at ``large`` names over time at ``small`` names, per non-encoding step."""
    by_size = {row["retain_names"]: row for row in rows}
    if small not in by_size or large not in by_size:
        return None
    a, b = by_size[small], by_size[large]
    ratios = {step: b["steps"][step] / a["steps"][step] for step in b["steps"]}
    ratios.update({name: b["seconds"][name] / a["seconds"][name] for name in ("warm", "solve")})
    return ratios


def _rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))


def peak_above(function, *args, **options) -> tuple[float, int, int]:
    """``(seconds, resident bytes before, highest resident bytes during)`` of ``function(*args)`` (sampled every
    5 ms)."""
    import threading

    before, peak, done = _rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        seconds = timed(function, *args, **options)
    finally:
        done.set()
        thread.join()
    return seconds, before, max(peak[0], before)


def worker(names: int, mode: str) -> None:
    """A fresh process, the demo model loaded: ``mode`` ``"build"``, the peak resident memory of one cold build with
    ``names`` × 80 prompts; ``"batch"``, of one forward of the text tower over the batch of 256 of those prompts with
    the most tokens (the activations one batch of the build holds)."""
    from hf_clip_forget.cli import load_dual_encoder
    from hf_clip_forget.core import IMAGENET_TEMPLATES, vocabulary_words
    from hf_clip_forget.core.prompt_cache import prompt_cache_disabled
    from hf_clip_forget.core.text_embeddings import _Tokenization

    model, tokenizer, _ = load_dual_encoder("demo", image_processor=False)
    words = vocabulary_words(tokenizer, names)
    if mode == "batch":
        prompts = [template.format(word) for word in words for template in IMAGENET_TEMPLATES]
        tokenize = _Tokenization.of(model, tokenizer)
        lengths = tokenize.lengths(prompts)
        longest = [prompts[i] for i in sorted(range(len(prompts)), key=lengths.__getitem__)[-256:]]
        inputs = tokenize(longest)
        with torch.inference_mode():
            seconds, before, peak = peak_above(model.get_text_features, **inputs)
        tokens = int(inputs["input_ids"].shape[1])
    else:
        with prompt_cache_disabled():
            seconds, before, peak = peak_above(build, model, tokenizer, words[:1], words[1:] or None,
                                               list(IMAGENET_TEMPLATES))  # fmt: skip
        tokens = None
    print(json.dumps({"names": names, "prompts": names * len(IMAGENET_TEMPLATES), "seconds": seconds,
                      "before_rss": before, "peak_rss": peak, "dim": model.config.projection_dim,
                      "batch_tokens": tokens}))  # fmt: skip


def _child(names: int, mode: str) -> dict:
    child = subprocess.run([sys.executable, __file__, "--worker", str(names), "--worker-mode", mode], check=True,
                           capture_output=True, text=True, env=os.environ)  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def prompts_scale(model, tokenizer, names_list: list[int]) -> list[dict]:
    """Cold build vs bare pass at ``names`` × 80 prompts, and the build's peak memory against the issue's bound,
    O(prompts × d) plus one batch of the tower's activations, taken as ``4 × prompts × d × 4`` bytes (the tower's
    float32 rows and their float64 normalised copy are three float32 copies; one more for slack) plus one batch's
    activations measured in their own process."""
    from hf_clip_forget.core import IMAGENET_TEMPLATES, vocabulary_words

    rows = []
    for names in names_list:
        words = vocabulary_words(tokenizer, names)
        prompts = [template.format(word) for word in words for template in IMAGENET_TEMPLATES]
        bare = timed(bare_pass, model, tokenizer, prompts)
        measured, batch = _child(names, "build"), _child(names, "batch")
        run = measured["peak_rss"] - measured["before_rss"]
        batch_bytes = batch["peak_rss"] - batch["before_rss"]
        rows_bytes = measured["prompts"] * measured["dim"] * 4
        row = {**measured, "bare_seconds": bare, "cold_over_bare": measured["seconds"] / bare, "run_bytes": run,
               "batch_bytes": batch_bytes, "batch_tokens": batch["batch_tokens"], "rows_bytes": rows_bytes,
               "bound_bytes": 4 * rows_bytes + batch_bytes, "bytes_per_prompt": run / measured["prompts"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def print_tables(result: dict) -> None:
    """The Markdown tables of ``docs/scale.md``."""
    print("| retain names | prompts | bare s | cold s | cold / bare | solve s | warm s | warm / solve "
          "| validation ms | tokenizer checks ms | cache lookups ms | checks share of warm |")  # fmt: skip
    print("|" + " --- |" * 12)
    for row in result["names"]:
        seconds, steps = row["seconds"], row["steps"]
        print(f"| {row['retain_names']:,} | {row['prompts']:,} | {seconds['bare']:.3f} | {seconds['cold']:.3f} | "
              f"{row['cold_over_bare']:.2f} | {seconds['solve']:.3f} | {seconds['warm']:.3f} | "
              f"{row['warm_over_solve']:.2f} | {1000 * steps['validation']:.1f} | "
              f"{1000 * steps['tokenizer checks']:.1f} | {1000 * steps['cache lookups']:.1f} | "
              f"{100 * row['checks_share_of_warm']:.1f} % |")  # fmt: skip
    print("\n| prompts | bare s | cold s | cold / bare | build's peak above the loaded model MB | rows MB "
          "| one batch MB | bound MB | bytes per prompt above the smallest build |")  # fmt: skip
    print("|" + " --- |" * 9)
    smallest = min(result["prompts"], key=lambda row: row["prompts"]) if result["prompts"] else None
    for row in result["prompts"]:
        extra = (row["run_bytes"] - smallest["run_bytes"]) / (row["prompts"] - smallest["prompts"] or 1)
        print(f"| {row['prompts']:,} | {row['bare_seconds']:.2f} | {row['seconds']:.2f} | {row['cold_over_bare']:.2f} "
              f"| {row['run_bytes'] / 1e6:.0f} | {row['rows_bytes'] / 1e6:.0f} | {row['batch_bytes'] / 1e6:.0f} | "
              f"{row['bound_bytes'] / 1e6:.0f} | {extra:,.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default="1,10,100,1000,10000,20000", help="retain-name counts")
    parser.add_argument("--prompt-names", default="1,10,100,1000,3000", help="names × 80 templates (prompt scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", default="build", help=argparse.SUPPRESS)
    parser.add_argument("--from-json", default=None, help="print the tables of a JSON this script wrote")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            print_tables(json.load(handle))
        return
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    os.environ["HF_HOME"] = os.environ.get("HF_CLIP_FORGET_SCALE_HOME") or tempfile.mkdtemp(
        prefix="hf_clip_forget-scale-"
    )
    if args.worker is not None:
        worker(args.worker, args.worker_mode)
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
    print_tables(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
