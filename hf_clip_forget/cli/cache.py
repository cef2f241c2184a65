"""``hf-clip-forget cache info`` and ``hf-clip-forget cache clear``: what the prompt-embedding cache and the
image-feature cache hold on disk, and emptying them."""

from __future__ import annotations

import os

from ..core.prompt_cache import clear_prompt_cache, prompt_cache_dir, prompt_cache_info


def add_cache_parser(commands) -> None:
    """The ``cache`` subcommand and its ``info`` and ``clear`` actions."""
    cache = commands.add_parser("cache", help="show or clear the prompt-embedding and image-feature caches")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="where the caches are, their entries and sizes")
    info.set_defaults(handler=command_cache_info)
    clear = actions.add_parser("clear", help="delete the cached entries (both caches unless one is named)")
    which = clear.add_mutually_exclusive_group()
    which.add_argument("--prompts", action="store_true", help="only the prompt embeddings")
    which.add_argument("--features", action="store_true", help="only the image features")
    clear.set_defaults(handler=command_cache_clear)


def _features_dir() -> str:
    from ..evaluation import features_cache_dir

    return features_cache_dir()


def _feature_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


def _prompts(count: int) -> str:
    return f"{count} prompt" + ("" if count == 1 else "s")


def command_cache_info(args) -> int:
    """Print each cache's folder, entries and total size; exit 0."""
    entries = prompt_cache_info()
    total = sum(entry.size for entry in entries)
    prompts = sum(entry.prompts or 0 for entry in entries)
    print(f"prompt embeddings: {prompt_cache_dir()}")
    print(f"  {_entries(len(entries))}, {_prompts(prompts)}, {_size(total)}")
    for entry in entries:
        shape = "unreadable" if entry.prompts is None else f"{_prompts(entry.prompts)} × {entry.dim}"
        shape += f" in {entry.shards} shards" if entry.shards > 1 else ""
        print(f"  {os.path.basename(entry.path)}  {shape}  {_size(entry.size)}")
    files = _feature_files(_features_dir())
    print(f"image features: {_features_dir()}")
    print(f"  {_entries(len(files))}, {_size(sum(os.path.getsize(path) for path in files))}")
    return 0


def command_cache_clear(args) -> int:
    """Delete the entries of the chosen cache(s) and say how many; exit 0."""
    if not args.features:
        removed = clear_prompt_cache()
        print(f"removed {_entries(removed)} of prompt embeddings from {prompt_cache_dir()}")
    if not args.prompts:
        folder = _features_dir()
        files = _feature_files(folder)
        for path in files:
            os.remove(path)
        print(f"removed {_entries(len(files))} of image features from {folder}")
    return 0
