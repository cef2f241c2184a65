"""A cache of prompt embeddings, shared by everything that encodes prompts (:func:`~.text_embeddings.encode_prompts`:
building an edit, the evaluation harness, sweeps, the audit), in memory within a process and on disk across them.

Building an edit costs what encoding its prompts costs — (forget + retain classes) × templates through the text
tower — while the solve takes milliseconds; a repeated edit (a sweep over α, stacking with the same retain list, an
audit, the CLI run twice) would pay that encoding again.

**What is cached: the unedited text embeddings.** A text-side forget layer's output *is* the text embedding, and its
edit is linear on it, so the edited embedding is ``layer.current_edit().apply(unedited)`` (then L2-normalised again
for a family whose embedding function normalises, as CLAP's). :func:`~.text_embeddings.encode_prompts` takes the
unedited embeddings from here, or computes them with every forget layer's edits bypassed, and applies the current
text-side edit, if any. One cache entry thus serves the model before and after any number of edits.

**The key** of an unedited embedding (:func:`cache_key`): a fingerprint of the tensors on the text path with edits
bypassed (:func:`~.text_path.text_path_fingerprint`: the text tower, the text-side layer's unedited weight and bias,
never forget factors; the model class and text configuration), the tokenizer's identity (:func:`tokenizer_key`: its
class, its serialised pipeline — vocabulary, normaliser, pre-tokeniser, post-processor — and the settings that change
token ids), the padding used (the family's ``text_padding``, the maximum length, truncation), the device type, and
the prompt string. Tensor hashes (sha256) are memoised by (identity, ``data_ptr``, ``_version``), so keying a warm
model costs about a millisecond, and any in-place change of a weight gives new embeddings.

**Where**: per key, in memory, one tensor of rows and a prompt → row dict (:class:`~.prompt_store.RowTable`: a
request's rows are gathered with one ``index_select``), and on disk, under the Hugging Face cache directory, a few
safetensors *shards* per key, ``$HF_HOME/hf_clip_forget/prompts/<key>.safetensors``, ``<key>.1.safetensors`` …
(next to the image-feature cache, ``.../features``). Each shard's metadata records the key (``parts`` as JSON, whose
hash is the file name), its prompts in row order, each row's identity (:func:`row_id`: sha256 of the key and the
prompt) and one sha256 over all of them together — key, prompts, row identities, the rows' shape and bytes
(:func:`~.prompt_store.file_digest`). A miss is stored as a new shard, written atomically (a temporary file renamed
into place) under the key's file lock: the rows already on disk are not rewritten, except that shards of at most
twice its size are merged into it (so a key keeps about log₂(rows) shards and a row is rewritten O(log rows) times
in all; :mod:`.prompt_store`). Rows another process stored meanwhile are read, not stored again. A shard that cannot
be read, whose recorded key is not the one its name says, whose row identities are not those of its key and
prompts, or whose checksum does not cover exactly its key, prompts and rows, is ignored *whole* with a warning (the
key's other shards still serve), its rows recomputed and stored anew, and the shard deleted: never used. A cache
directory that cannot be written leaves the memory cache working, with a warning naming it.

**What the checks defend against, and what not.** The cache lives in the user's own ``HF_HOME``; it is a cache, not
a trust boundary. The checks catch accidental damage (a truncated or partly written file, flipped bits, a file
copied under another key's name, files of an older format) and edits of one part that leave the others as they were:
prompts swapped or renamed in the metadata, a row edited with the checksum left alone or recomputed the way format 1
did (over the rows only), a row moved to another key's file (its identity hashes that key). A row is only ever
returned for the prompt and key whose identity it is stored under. They cannot catch a deliberate forgery by someone
who can write the cache folder and rewrites *every* field consistently (new rows, identities and checksum by this
module's own public recipe): without a secret no checksum can, and whoever can write ``HF_HOME`` can equally replace
the models and code it holds. Clear the cache (``hf-clip-forget cache clear``) or turn it off (``use_cache=False``,
``HF_CLIP_FORGET_PROMPT_CACHE=0``) if that folder is shared with someone you do not trust.

**Bypass and management**: ``use_cache=False`` on ``encode_prompts``, ``class_text_embeddings``,
``add_forget_adapter`` and the harness; ``HF_CLIP_FORGET_PROMPT_CACHE=0`` (or ``false``/``off``/``no``) turns it off
process-wide, as does :func:`prompt_cache_disabled` within a context and the CLI's ``--no-prompt-cache``;
``hf-clip-forget cache info`` and ``hf-clip-forget cache clear`` show and empty it (:func:`prompt_cache_info`,
:func:`clear_prompt_cache`). Embeddings are computed without the cache (as the model computes them, directly) when
the key cannot be formed: a tokenizer with no serialisable vocabulary, a model in training mode (dropout), weights
on the meta device, or an active text edit on a family whose embedding is neither the layer's output nor its
normalisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prompt_store import CACHE_FORMAT, SUFFIX, StoredKey, append_rows, key_of, refresh, row_id, shard_numbers


#: The environment variable that turns the prompt cache off process-wide (``0``, ``false``, ``off`` or ``no``).
PROMPT_CACHE_ENV = "HF_CLIP_FORGET_PROMPT_CACHE"
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")
#: Tokenizer init arguments that say where the files came from, not how text is tokenised.
_TOKENIZER_PROVENANCE = ("name_or_path", "vocab_file", "tokenizer_file", "merges_file", "is_local", "local_files_only")

_disabled_depth = 0


def prompt_cache_dir() -> str:
    """Where cached prompt embeddings live: ``$HF_HOME/hf_clip_forget/prompts`` (``HF_HOME`` read now, defaulting
    as ``huggingface_hub`` does to ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    home = os.path.expanduser(os.environ.get("HF_HOME", default))
    return os.path.join(home, "hf_clip_forget", "prompts")


def prompt_cache_enabled(use_cache: bool = True) -> bool:
    """Whether encoding uses the cache: ``use_cache``, unless :data:`PROMPT_CACHE_ENV` or
    :func:`prompt_cache_disabled` turns it off. An unrecognised value of the variable is a ``ValueError``."""
    value = os.environ.get(PROMPT_CACHE_ENV, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(
            f"{PROMPT_CACHE_ENV}={os.environ[PROMPT_CACHE_ENV]!r} is not understood: set it to 0 to turn the prompt "
            "cache off, or unset it (or 1) to use it."
        )
    return bool(use_cache) and value not in _OFF and _disabled_depth == 0


@contextlib.contextmanager
def prompt_cache_disabled():
    """Within this context no encoding in this process uses the prompt cache (the CLI's ``--no-prompt-cache``)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


# ----------------------------------------------------------------------------------------------------------- keys
#: id(tokenizer) → (weak reference, cheap settings, key)
_TOKENIZER_KEYS: dict[int, tuple[weakref.ref, tuple, str | None]] = {}


def _tokenizer_settings(tokenizer) -> tuple:
    """Settings read at every call (cheap): a change re-keys a tokenizer edited in place (tokens added, padding
    side switched)."""
    return (
        len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        getattr(tokenizer, "padding_side", None),
        getattr(tokenizer, "truncation_side", None),
        getattr(tokenizer, "pad_token_id", None),
        tuple(getattr(tokenizer, "model_input_names", ()) or ()),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
    )


def tokenizer_key(tokenizer) -> str | None:
    """sha256 of what makes ``tokenizer`` produce its token ids: its class, its serialised pipeline (a fast
    tokenizer's ``backend_tokenizer.to_str()`` — vocabulary, normaliser, pre-tokeniser, post-processor — without the
    call-time truncation and padding, which the key records separately; otherwise its vocabulary), its init
    settings and :func:`_tokenizer_settings`; memoised per tokenizer object while those settings stay the same.
    ``None`` when there is nothing to serialise (then nothing is cached)."""
    settings = _tokenizer_settings(tokenizer)
    known = _TOKENIZER_KEYS.get(id(tokenizer))
    if known is not None and known[0]() is tokenizer and known[1] == settings:
        return known[2]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        pipeline = _pipeline_without_call_settings(backend.to_str())
    elif callable(getattr(tokenizer, "get_vocab", None)):
        pipeline = sorted(tokenizer.get_vocab().items())
    else:
        pipeline = None
    key = None
    if pipeline is not None:
        init = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _TOKENIZER_PROVENANCE}
        parts = [f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", pipeline, init, settings]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    identity = id(tokenizer)
    with contextlib.suppress(TypeError):  # an object that takes no weak reference is keyed anew each call
        ref = weakref.ref(tokenizer, lambda ref: _drop(_TOKENIZER_KEYS, identity, ref))
        _TOKENIZER_KEYS[identity] = (ref, settings, key)
    return key


def _pipeline_without_call_settings(serialised: str) -> str:
    """A fast tokenizer's serialised pipeline without its ``truncation`` and ``padding`` entries, which each call
    sets anew (the key records the call's own settings). The serialiser writes them before ``added_tokens``, so
    that cut is taken without parsing the whole vocabulary (~0.5 MB of JSON: parsing it would cost more than the
    rest of a warm encoding); should the order ever differ, the entries stay in and only make the key stricter."""
    start = serialised.find('"added_tokens"')
    return serialised[start:] if start > 0 else serialised


def _drop(table: dict, key: int, ref: weakref.ref) -> None:
    if key in table and table[key][0] is ref:
        del table[key]


def cache_key(parts: dict) -> str:
    """The file name (without suffix) of the entry described by ``parts`` (JSON-serialisable)."""
    return hashlib.sha256(_parts_json(parts).encode()).hexdigest()[:32]


def _parts_json(parts: dict) -> str:
    return json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------- store
#: Each key's rows and shards read, in this process.
_MEMORY: dict[str, StoredKey] = {}
_UNWRITABLE: set[str] = set()


def cached_embeddings(parts: dict, prompts: Sequence[str], compute: Callable[[list[str]], Tensor]) -> Tensor:
    """``(len(prompts), d)`` float32 embeddings of (non-empty) ``prompts`` under the key ``parts``: from memory, else
    from the key's shards on disk, else ``compute(missing prompts)`` (each distinct prompt once), then held in memory
    and stored on disk as a new shard (:func:`~.prompt_store.append_rows`). The rows are gathered from the key's
    :class:`~.prompt_store.RowTable` at once: linear in ``prompts``, whatever else the table holds."""
    key = cache_key(parts)
    stored = _MEMORY.setdefault(key, StoredKey())
    try:
        return stored.rows.gather(prompts)  # everything in memory: one pass over the prompts
    except KeyError:
        pass
    folder, parts_json = prompt_cache_dir(), _parts_json(parts)
    refresh(folder, key, parts_json, stored)
    missing = stored.rows.missing(prompts)
    computed = torch.empty(0)
    if missing:
        computed = compute(missing).detach().to(device="cpu", dtype=torch.float32)
        stored.rows.add(missing, computed)
    if missing or stored.unusable:  # an unusable shard is deleted even when the others held every row
        _store(folder, key, parts_json, missing, computed, stored)
    return stored.rows.gather(prompts)


def _store(folder: str, key: str, parts_json: str, prompts: list[str], rows: Tensor, stored: StoredKey) -> None:
    """Append the rows to the key's shards on disk; a folder that cannot be written is warned about once."""
    try:
        append_rows(folder, key, parts_json, prompts, rows, stored)
    except OSError as error:
        if folder not in _UNWRITABLE:
            _UNWRITABLE.add(folder)
            warnings.warn(
                f"Prompt embeddings cannot be cached on disk in {folder!r} ({error}); they are kept in memory for "
                f"this process only. Set HF_HOME to a writable folder, or {PROMPT_CACHE_ENV}=0 to turn the cache off.",
                stacklevel=4,
            )


# ----------------------------------------------------------------------------------------------------- management
@dataclass(frozen=True)
class PromptCacheEntry:
    """One key of the prompt cache on disk: the path of its first shard, the size in bytes of all its shards, the
    number of prompts and the embedding dimension of those that can be read (``None`` when none can), and the
    number of its shard files."""

    path: str
    size: int
    prompts: int | None
    dim: int | None
    shards: int = 1


def prompt_cache_info(cache_dir: str | None = None) -> list[PromptCacheEntry]:
    """Every key of the prompt cache on disk, largest first."""
    from safetensors import safe_open

    folder = cache_dir or prompt_cache_dir()
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    by_key: dict[str, list[str]] = {}
    for name in names:
        if key_of(name) is not None:
            by_key.setdefault(key_of(name), []).append(name)
    entries = []
    for key, shards in by_key.items():
        shards.sort(key=shard_numbers(folder, key).__getitem__)
        count, dim, size = None, None, 0
        for name in shards:
            path = os.path.join(folder, name)
            size += os.path.getsize(path)
            try:
                with safe_open(path, "pt") as file:
                    rows, dim = file.get_slice("embeddings").get_shape()
                count = (count or 0) + rows
            except Exception:  # noqa: BLE001 - an unreadable shard is not counted (the next encode replaces it)
                continue
        entries.append(PromptCacheEntry(os.path.join(folder, shards[0]), size, count, dim, len(shards)))
    return sorted(entries, key=lambda entry: -entry.size)


def clear_prompt_cache(cache_dir: str | None = None) -> int:
    """Delete every file of the prompt cache (shards, locks, staging files) and this process's memory cache.
    Returns the number of keys whose shards were deleted."""
    _MEMORY.clear()
    folder = cache_dir or prompt_cache_dir()
    if not os.path.isdir(folder):
        return 0
    removed = set()
    for name in os.listdir(folder):
        if name.endswith((SUFFIX, ".lock", ".partial")):
            os.remove(os.path.join(folder, name))
            if name.endswith(SUFFIX):
                removed.add(name.split(".", 1)[0])
    return len(removed)


__all__ = [
    "CACHE_FORMAT",
    "PROMPT_CACHE_ENV",
    "PromptCacheEntry",
    "cache_key",
    "cached_embeddings",
    "clear_prompt_cache",
    "prompt_cache_dir",
    "prompt_cache_disabled",
    "prompt_cache_enabled",
    "prompt_cache_info",
    "row_id",
    "tokenizer_key",
]
