"""Benchmark ``edit_index`` against the I/O limit, and check it on real images.

1. **Throughput.** A synthetic clip-retrieval index (``--vectors`` unit-length float16 rows of ``--dim``, in
   ``--shards`` ``img_emb_<i>.npy`` files, plus metadata parquet files) is edited with a random rank-``--rank`` edit
   ``M = I − U Vᵀ`` (``U ≠ V``, as CCUP's; the cost depends on n, d and r only). In the same process, interleaved
   over ``--rounds`` rounds, the same shards go through a **plain copy** — read every byte, write it to a new file,
   flush it to disk (``fsync``), with the same number of shards in flight — which is the limit on this machine: the
   edit cannot write its output with less I/O. Reported: median seconds and GB/s (input bytes), edit / copy.
2. **Memory.** One more edit run in a child process: its peak RSS against the size of one shard.
3. **Re-encoding.** The demo model's image throughput on ``--encode-images`` PACS test images (the vision tower and
   the projection, what rebuilding an index from the images costs), extrapolated to ``--vectors`` images, against
   the edit's time.
4. **Correctness on real images.** Every PACS test image's embedding from the unedited demo model, edited with
   ``edit_embeddings`` (a stack: "dog" forgotten everywhere, "horse" in sketches), against the merged model's
   embeddings of the same images: the lowest cosine and the largest relative error, float32 and normalised float16.

    python scripts/benchmark_index.py --data-dir ../shared/data --json docs/index_benchmark.json

The synthetic index is written under ``--workdir`` (default: a temporary folder, removed at the end); it needs
about three times the index's size on disk (input, edit output, copy output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def write_synthetic_index(root: str, vectors: int, dim: int, shards: int, seed: int = 0) -> int:
    """A clip-retrieval folder of unit-length float16 vectors; returns the bytes of its shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "img_emb"))
    os.makedirs(os.path.join(root, "metadata"))
    rng, total, per_shard = np.random.default_rng(seed), 0, -(-vectors // shards)
    for index in range(shards):
        rows = min(per_shard, vectors - index * per_shard)
        values = rng.standard_normal((rows, dim), dtype=np.float32)
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        path = os.path.join(root, "img_emb", f"img_emb_{index}.npy")
        np.save(path, values.astype(np.float16))
        total += os.path.getsize(path)
        pq.write_table(pa.table({"url": [f"https://example.com/{index}/{j}.jpg" for j in range(rows)]}),
                       os.path.join(root, "metadata", f"metadata_{index}.parquet"))  # fmt: skip
    return total


def synthetic_edit(dim: int, rank: int, seed: int = 0):
    from hf_clip_forget.index import EmbeddingEdit

    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    right = left + 0.1 * torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    return EmbeddingEdit("image", dim, left.float().contiguous(), right.float().contiguous())


def plain_copy(source: str, target: str, workers: int) -> float:
    """Read every shard and write it to ``target``, flushed, ``workers`` at a time; the seconds it took."""
    shards = sorted(os.listdir(os.path.join(source, "img_emb")))
    os.makedirs(os.path.join(target, "img_emb"))

    def copy(name: str) -> None:
        with open(os.path.join(source, "img_emb", name), "rb") as handle:
            data = handle.read()
        with open(os.path.join(target, "img_emb", name), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(copy, shards))
    return time.perf_counter() - started


def timed_edit(edit, source: str, target: str, workers: int) -> float:
    from hf_clip_forget.index import edit_index

    started = time.perf_counter()
    edit_index(edit, source, target, workers=workers, show_progress=False)
    return time.perf_counter() - started


def throughput(args, root: str) -> dict:
    source = os.path.join(root, "index")
    size = write_synthetic_index(source, args.vectors, args.dim, args.shards)
    edit, times = synthetic_edit(args.dim, args.rank), {"copy": [], "edit": []}
    plain_copy(source, os.path.join(root, "warm"), args.workers)  # both conditions read from the page cache
    shutil.rmtree(os.path.join(root, "warm"))
    for round_index in range(args.rounds):
        for name in ("copy", "edit") if round_index % 2 == 0 else ("edit", "copy"):
            target = os.path.join(root, f"{name}-{round_index}")
            run = plain_copy if name == "copy" else lambda s, t, w: timed_edit(edit, s, t, w)
            times[name].append(run(source, target, args.workers))
            shutil.rmtree(target)
            print(f"round {round_index}: {name} {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "vectors": args.vectors, "dim": args.dim, "dtype": "float16", "shards": args.shards, "rank": args.rank,
        "workers": args.workers, "bytes": size, "seconds": times, "median_seconds": medians,
        "gb_per_s": {name: size / seconds / 1e9 for name, seconds in medians.items()},
        "edit_over_copy_throughput": medians["copy"] / medians["edit"],
        "rss_bytes": peak_memory(args, source, root), "shard_bytes": size // args.shards,
    }  # fmt: skip


def peak_memory(args, source: str, root: str) -> dict:
    """Resident memory of a fresh child process once the library is imported, and the highest it reaches during one
    edit run (sampled every 5 ms from /proc/self/status), in bytes."""
    code = (
        "import sys, threading, time; sys.path.insert(0, sys.argv[1]); import benchmark_index as b; "
        "import hf_clip_forget.index; e = b.synthetic_edit(int(sys.argv[2]), int(sys.argv[3])); "
        "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024; "
        "base = rss(); peak = [base]; done = threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.005)\n"
        "t = threading.Thread(target=watch); t.start(); b.timed_edit(e, sys.argv[4], sys.argv[5], int(sys.argv[6])); "
        "done.set(); t.join(); print(base); print(peak[0])"
    )
    target = os.path.join(root, "memory")
    output = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(args.dim), str(args.rank),
                             source, target, str(args.workers)], check=True, capture_output=True, text=True).stdout  # fmt: skip
    shutil.rmtree(target)
    imported, peak = (int(line) for line in output.strip().splitlines()[-2:])
    return {"after_import": imported, "peak": peak, "run": peak - imported}


def real_images(args) -> dict:
    """Re-encoding throughput and the equality on every PACS test image (demo model)."""
    from hf_clip_forget import add_forget_adapter
    from hf_clip_forget.cli import cached_image_features
    from hf_clip_forget.evaluation import load_labelled_images, project_image_features
    from hf_clip_forget.index import edit_embeddings
    from hf_clip_forget.models.demo import load_demo_model

    model, processor = load_demo_model()
    path = os.path.join(args.data_dir, "pacs", "test.parquet")
    images = load_labelled_images(path, split="test").select(range(args.encode_images))
    pixels = processor.image_processor(list(images["image"]), return_tensors="pt")["pixel_values"]
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(pixels), 32):
            model.get_image_features(pixel_values=pixels[start : start + 32])
    images_per_second = len(pixels) / (time.perf_counter() - started)
    features = cached_image_features(model, processor.image_processor, path, "test", "demo")
    classes = list(features.class_names)
    with torch.no_grad():
        stored = project_image_features(model, features)
    edited = add_forget_adapter(model, ["dog"], processor.tokenizer, retain_classes=[c for c in classes if c != "dog"],
                                show_progress=False)  # fmt: skip
    edited = add_forget_adapter(edited, ["horse"], processor.tokenizer, domains=["sketch"], adapter_name="sketch_horse",
                                retain_classes=[c for c in classes if c != "horse"], show_progress=False,
                                retain_domains=["art_painting", "cartoon", "photo"])  # fmt: skip
    edited.base_model.set_adapter(["default", "sketch_horse"])
    edited.merge_adapter()
    with torch.no_grad():
        merged = project_image_features(edited, features)
    from_index = edit_embeddings(edited, stored)
    half = edit_embeddings(edited, torch.nn.functional.normalize(stored, dim=-1).half())
    edited.unload()
    cosine = torch.nn.functional.cosine_similarity(from_index.double(), merged.double(), dim=-1)
    cosine_half = torch.nn.functional.cosine_similarity(half.double(), merged.double(), dim=-1)
    relative = (from_index - merged).norm(dim=-1) / merged.norm(dim=-1)
    return {
        "images": len(stored), "min_cosine_float32": float(cosine.min()), "max_relative_error": float(relative.max()),
        "min_cosine_float16_normalised": float(cosine_half.min()), "encode_images": len(pixels),
        "encode_images_per_second": images_per_second,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encode-images", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="the shared data (for the real-image parts)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="hf_clip_forget-index-bench-", dir=args.workdir)
    try:
        result = {"throughput": throughput(args, root), "command": " ".join(sys.argv), "torch": torch.__version__}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.data_dir:
        result["real_images"] = real_images(args)
        seconds = result["throughput"]["median_seconds"]["edit"]
        reencode = args.vectors / result["real_images"]["encode_images_per_second"]
        result["reencode_seconds_extrapolated"] = reencode
        result["reencode_over_edit"] = reencode / seconds
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
