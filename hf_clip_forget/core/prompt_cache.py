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

**Where**: a dict per key in memory, and one safetensors file per key under the Hugging Face cache directory,
``$HF_HOME/hf_clip_forget/prompts/<key>.safetensors`` (next to the image-feature cache, ``.../features``). Its
metadata records the key (``parts`` as JSON, whose hash is the file name), the prompts in row order, each row's
identity (:func:`row_id`: sha256 of the key and the prompt) and one sha256 over all of them together — key, prompts,
row identities, the rows' shape and bytes (:func:`_file_digest`). Files are written atomically (a temporary file
renamed over the old one) under a file lock, merging the rows another process wrote meanwhile. A file that cannot be
read, whose recorded key is not the one its name says, whose row identities are not those of its key and prompts, or
whose checksum does not cover exactly its key, prompts and rows, is ignored *whole* with a warning and its rows
recomputed and rewritten: never used. A cache directory that cannot be written leaves the memory cache working, with
a warning naming it.

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
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


#: The environment variable that turns the prompt cache off process-wide (``0``, ``false``, ``off`` or ``no``).
PROMPT_CACHE_ENV = "HF_CLIP_FORGET_PROMPT_CACHE"
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")
#: Bump when the embeddings cached for the same key change meaning, or the file layout changes; old files are then
#: ignored (their key differs). 2: the checksum covers key, prompts, row identities and rows together.
CACHE_FORMAT = 2
_SUFFIX = ".safetensors"
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


def row_id(parts_json: str, prompt: str) -> str:
    """The identity of ``prompt``'s row under the key ``parts_json`` (its JSON, as the file records it): sha256 of
    both, so that a row recorded under another prompt, or copied from another key's file, is not found."""
    return hashlib.sha256(json.dumps([parts_json, prompt]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- store
@dataclass
class _Entry:
    """One key's rows in memory, and the state (mtime, size, inode) of its file when last read or written."""

    rows: dict[str, Tensor]
    seen: tuple | None = None


_MEMORY: dict[str, _Entry] = {}
_UNWRITABLE: set[str] = set()


def cached_embeddings(parts: dict, prompts: Sequence[str], compute: Callable[[list[str]], Tensor]) -> Tensor:
    """``(len(prompts), d)`` float32 embeddings of (non-empty) ``prompts`` under the key ``parts``: from memory, else
    from the entry's file, else ``compute(missing prompts)`` (each distinct prompt once), then stored in both."""
    key = cache_key(parts)
    path = os.path.join(prompt_cache_dir(), key + _SUFFIX)
    entry = _MEMORY.setdefault(key, _Entry({}))
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in entry.rows]
    state = _file_state(path) if missing else None
    if state is not None and state != entry.seen:  # written (by another process) since this one last read it
        entry.rows.update(_read(path, _parts_json(parts)) or {})
        entry.seen = state
        missing = [prompt for prompt in missing if prompt not in entry.rows]
    if missing:
        computed = compute(missing).detach().to(device="cpu", dtype=torch.float32)
        new = dict(zip(missing, computed, strict=True))
        entry.rows.update(new)
        _write(path, _parts_json(parts), new, entry)
    return torch.stack([entry.rows[prompt] for prompt in prompts])


def _file_state(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read(path: str, parts_json: str, warn: bool = True) -> dict[str, Tensor] | None:
    """The rows of the file at ``path``, or ``None`` when it is missing; a file that is unreadable or does not match
    ``parts_json`` (another key, a truncated or altered file) is treated as empty (and, with ``warn``, warned
    about)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            rows = file.get_tensor("embeddings")
        prompts, ids = json.loads(metadata["prompts"]), json.loads(metadata["rows"])
        problem = _mismatch(metadata, parts_json, prompts, ids, rows)
    except Exception as error:  # noqa: BLE001 - any unreadable file means the same: recompute and rewrite it
        problem = f"it cannot be read ({type(error).__name__}: {error})"
    if problem and warn:
        warnings.warn(
            f"Ignoring the cached prompt embeddings {path!r}: {problem}. They are recomputed and the file rewritten.",
            stacklevel=4,
        )
    if problem:
        return {}
    return dict(zip(prompts, rows, strict=True))


def _mismatch(metadata: dict, parts_json: str, prompts, ids, rows: Tensor) -> str | None:
    """Why the file's contents cannot be used under ``parts_json`` (``None``: they can)."""
    if metadata.get("key") != parts_json:
        return "its recorded key is not the one it is stored under"
    if (
        not isinstance(prompts, list)
        or not isinstance(ids, list)
        or not all(isinstance(prompt, str) for prompt in prompts)
        or len(set(prompts)) != len(prompts)
        or rows.ndim != 2
        or rows.dtype != torch.float32
        or rows.shape[0] != len(prompts)
        or len(ids) != len(prompts)
    ):
        return "its prompts, row identities and rows do not match"
    if metadata.get("sha256") != _file_digest(parts_json, prompts, ids, rows):
        return "its checksum does not match its key, prompts and rows"
    wrong = next((i for i, prompt in enumerate(prompts) if ids[i] != row_id(parts_json, prompt)), None)
    if wrong is not None:
        return (
            f"row {wrong} is recorded for the prompt {prompts[wrong]!r} but its identity is another prompt's or key's"
        )
    return None


def _file_digest(parts_json: str, prompts: list[str], ids: list[str], rows: Tensor) -> str:
    """sha256 of everything a file's rows mean together: the key, the prompts and row identities in row order, the
    rows' dtype and shape, and their bytes. Changing any one of them (swapping two prompts, editing a row) without
    recomputing this by the same recipe is detected."""
    digest = hashlib.sha256(
        json.dumps([CACHE_FORMAT, parts_json, prompts, ids, str(rows.dtype), list(rows.shape)]).encode()
    )
    digest.update(b"\0")
    digest.update(rows.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write(path: str, parts_json: str, new: dict[str, Tensor], entry: _Entry) -> None:
    """Merge ``new`` rows into the file at ``path`` under its lock (keeping rows another process wrote meanwhile),
    atomically; the merged rows join ``entry``. A directory that cannot be written is warned about once."""
    from filelock import FileLock
    from safetensors.torch import save_file

    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with FileLock(path + ".lock"):
            rows = _read(path, parts_json, warn=False) or {}  # warned about when it was read
            rows.update(new)
            prompts = list(rows)
            ids = [row_id(parts_json, prompt) for prompt in prompts]
            stacked = torch.stack([rows[prompt] for prompt in prompts]).contiguous()
            metadata = {
                "key": parts_json,
                "prompts": json.dumps(prompts),
                "rows": json.dumps(ids),
                "sha256": _file_digest(parts_json, prompts, ids, stacked),
            }
            handle, staging = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".partial")
            os.close(handle)
            try:
                save_file({"embeddings": stacked}, staging, metadata=metadata)
                os.replace(staging, path)
            finally:
                if os.path.exists(staging):
                    os.remove(staging)
            entry.rows.update(rows)
            entry.seen = _file_state(path)
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
    """One file of the prompt cache: its path, size in bytes, number of prompts and embedding dimension (``None``
    for a file that cannot be read)."""

    path: str
    size: int
    prompts: int | None
    dim: int | None


def prompt_cache_info(cache_dir: str | None = None) -> list[PromptCacheEntry]:
    """Every entry of the prompt cache on disk, largest first."""
    from safetensors import safe_open

    folder = cache_dir or prompt_cache_dir()
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    entries = []
    for name in (name for name in names if name.endswith(_SUFFIX)):
        path = os.path.join(folder, name)
        try:
            with safe_open(path, "pt") as file:
                count, dim = file.get_slice("embeddings").get_shape()
        except Exception:  # noqa: BLE001 - an unreadable file is listed as such (the next encode rewrites it)
            count = dim = None
        entries.append(PromptCacheEntry(path, os.path.getsize(path), count, dim))
    return sorted(entries, key=lambda entry: -entry.size)


def clear_prompt_cache(cache_dir: str | None = None) -> int:
    """Delete every file of the prompt cache (entries, locks, staging files) and this process's memory cache.
    Returns the number of entries deleted."""
    _MEMORY.clear()
    folder = cache_dir or prompt_cache_dir()
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if name.endswith((_SUFFIX, ".lock", ".partial")):
            os.remove(os.path.join(folder, name))
            removed += name.endswith(_SUFFIX)
    return removed


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
