"""Where the prompt cache (:mod:`.prompt_cache`) keeps its rows: in memory, one tensor per key (:class:`RowTable`),
and on disk, a few shard files per key, to which a miss adds one without rewriting the others whole.

**Shards.** A key's rows live in ``<key>.safetensors``, ``<key>.1.safetensors``, ``<key>.2.safetensors`` …, each a
complete file of its own: the key (its ``parts`` as JSON), the prompts in row order, each row's identity
(:func:`row_id`) and one sha256 over all of them (:func:`file_digest`). A miss writes its rows as a new shard, into
which the key's shards of at most :data:`MERGE_RATIO` times its rows are merged (:func:`append_rows`); a larger
shard is left as it is. A merged row lands in a shard at least 1.5 times the one it left, so every row is rewritten
O(log rows) times in all, and each shard holds more than twice the next smaller one: a key has at most
log₂(rows) + 1 shards. Shards are written atomically (a temporary file renamed into place) under the key's file
lock; they are read without it, a shard that vanishes meanwhile (merged by another process) being looked for again
in a new listing. A shard that cannot be read, or whose key, row identities or checksum do not match, is ignored
*whole* with a warning (its rows are recomputed) and deleted at the next write of its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


#: Bump when the embeddings cached for the same key change meaning, or a shard's layout changes; old files are then
#: ignored (their key differs). 2: the checksum covers key, prompts, row identities and rows together.
CACHE_FORMAT = 2
SUFFIX = ".safetensors"
#: A shard is merged into the shard being written when it holds at most this many times its rows.
MERGE_RATIO = 2


def row_id(parts_json: str, prompt: str) -> str:
    """The identity of ``prompt``'s row under the key ``parts_json`` (its JSON, as the file records it): sha256 of
    both, so that a row recorded under another prompt, or copied from another key's file, is not found."""
    return hashlib.sha256(json.dumps([parts_json, prompt]).encode()).hexdigest()


def file_digest(parts_json: str, prompts: list[str], ids: list[str], rows: Tensor) -> str:
    """sha256 of everything a shard's rows mean together: the key, the prompts and row identities in row order, the
    rows' dtype and shape, and their bytes. Changing any one of them (swapping two prompts, editing a row) without
    recomputing this by the same recipe is detected."""
    digest = hashlib.sha256(
        json.dumps([CACHE_FORMAT, parts_json, prompts, ids, str(rows.dtype), list(rows.shape)]).encode()
    )
    digest.update(b"\0")
    digest.update(rows.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------- memory
class RowTable:
    """Rows by prompt (or any hashable), held as one ``(capacity, d)`` CPU tensor of ``dtype`` and a prompt → row
    dict: adding rows copies only them (the tensor grows by half when full), and :meth:`gather` returns any rows
    with one ``index_select``."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._data: Tensor | None = None
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int | None:
        return None if self._data is None else self._data.shape[1]

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct ``prompts`` not held, in first-seen order."""
        index = self.index
        return [prompt for prompt in dict.fromkeys(prompts) if prompt not in index]

    def add(self, prompts: Sequence[str], rows: Tensor) -> None:
        """Hold ``rows[i]`` for ``prompts[i]`` (each prompt's first row; one already held keeps its row)."""
        fresh: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            if prompt not in self.index and prompt not in fresh:
                fresh[prompt] = i
        if not fresh:
            return
        rows = rows.detach().to(device="cpu", dtype=self.dtype)
        if len(fresh) < len(prompts):
            rows = rows.index_select(0, torch.tensor(list(fresh.values()), dtype=torch.long))
        start = len(self.index)
        self._reserve(start + len(fresh), rows.shape[1])
        self._data[start : start + len(fresh)] = rows
        self.index.update(zip(fresh, range(start, start + len(fresh)), strict=True))

    def _reserve(self, count: int, dim: int) -> None:
        if self._data is not None and count <= self._data.shape[0]:
            return
        # grown by half (not doubled): a table of 80,000 prompts should not hold room for 80,000 more
        capacity = count if self._data is None else max(count, self._data.shape[0] * 3 // 2)
        grown = torch.empty(capacity, dim, dtype=self.dtype)
        if self._data is not None:
            grown[: len(self.index)] = self._data[: len(self.index)]
        self._data = grown

    def gather(self, prompts: Sequence[str]) -> Tensor:
        """``(len(prompts), d)``: each prompt's row (all held), as a new tensor."""
        positions = torch.tensor([self.index[prompt] for prompt in prompts], dtype=torch.long)
        if self._data is None:
            return torch.empty(0, dtype=self.dtype)
        return self._data.index_select(0, positions)


@dataclass
class StoredKey:
    """One key in memory: its rows, and each of its shards read (file name → its state when read, and how many rows
    it holds: ``None`` for a shard found unusable)."""

    rows: RowTable = field(default_factory=RowTable)
    shards: dict[str, tuple[tuple, int | None]] = field(default_factory=dict)

    @property
    def unusable(self) -> bool:
        """Whether a shard read was found unusable (it is deleted at the key's next write)."""
        return any(count is None for _, count in self.shards.values())


# ------------------------------------------------------------------------------------------------------ reading
def shard_name(key: str, number: int) -> str:
    return f"{key}{SUFFIX}" if number == 0 else f"{key}.{number}{SUFFIX}"


def shard_numbers(folder: str, key: str) -> dict[str, int]:
    """The key's shard files in ``folder``: name → number."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    return {name: number for name in names if (number := _shard_number(name, key)) is not None}


def _shard_number(name: str, key: str) -> int | None:
    if not name.startswith(key) or not name.endswith(SUFFIX):
        return None
    middle = name[len(key) : -len(SUFFIX)]
    if middle == "":
        return 0
    return int(middle[1:]) if middle.startswith(".") and middle[1:].isdigit() else None


def refresh(folder: str, key: str, parts_json: str, stored: StoredKey) -> set[str]:
    """Read the key's shards not read yet (or changed since) into ``stored``; the prompts they hold. A shard that
    vanishes while being read (another process merged it) has its rows in the shard it was merged into: the folder
    is listed again."""
    found: set[str] = set()
    for _ in range(3):
        names = shard_numbers(folder, key)
        for gone in set(stored.shards) - set(names):
            del stored.shards[gone]
        vanished = False
        for name in sorted(names, key=names.__getitem__):
            state = _file_state(os.path.join(folder, name))
            if state is None or stored.shards.get(name, ((), 0))[0] == state:
                vanished |= state is None
                continue
            read = read_shard(os.path.join(folder, name), parts_json, stored.rows.dim)
            if read is None:
                vanished = True
                continue
            prompts, rows = read
            if rows is not None:
                stored.rows.add(prompts, rows)
            stored.shards[name] = (state, len(prompts) if rows is not None else None)
            found.update(prompts)
        if not vanished:
            break
    return found


def _file_state(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def read_shard(path: str, parts_json: str, dim: int | None, warn: bool = True) -> tuple[list, Tensor | None] | None:
    """``(prompts, rows)`` of the shard at ``path``; ``([], None)`` for one that is unreadable or does not match
    ``parts_json`` (another key, a truncated or altered file; with ``warn``, warned about); ``None`` when it is
    missing."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            rows = file.get_tensor("embeddings")
        prompts, ids = json.loads(metadata["prompts"]), json.loads(metadata["rows"])
        problem = _mismatch(metadata, parts_json, prompts, ids, rows, dim)
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - any unreadable file means the same: recompute its rows
        problem = f"it cannot be read ({type(error).__name__}: {error})"
    if problem and warn:
        warnings.warn(
            f"Ignoring the cached prompt embeddings {path!r}: {problem}. Its rows are recomputed and stored anew, "
            "and the file deleted.",
            stacklevel=5,
        )
    return ([], None) if problem else (prompts, rows)


def _mismatch(metadata: dict, parts_json: str, prompts, ids, rows: Tensor, dim: int | None) -> str | None:
    """Why the shard's contents cannot be used under ``parts_json`` (``None``: they can)."""
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
    if metadata.get("sha256") != file_digest(parts_json, prompts, ids, rows):
        return "its checksum does not match its key, prompts and rows"
    wrong = next((i for i, prompt in enumerate(prompts) if ids[i] != row_id(parts_json, prompt)), None)
    if wrong is not None:
        return (
            f"row {wrong} is recorded for the prompt {prompts[wrong]!r} but its identity is another prompt's or key's"
        )
    if dim is not None and rows.shape[1] != dim:
        return f"its rows have {rows.shape[1]} dimensions where the key's other rows have {dim}"
    return None


# ------------------------------------------------------------------------------------------------------ writing
def append_rows(folder: str, key: str, parts_json: str, prompts: list[str], rows: Tensor, stored: StoredKey) -> None:
    """Store ``rows`` of ``prompts`` (held in ``stored`` already; none: only tidy up) on disk, under the key's file
    lock: as a new shard, into which the key's shards holding at most :data:`MERGE_RATIO` times its rows are merged
    (smallest first, the shard growing as it takes them). Rows another process stored meanwhile are not stored
    again; the shards found unusable are deleted. Raises ``OSError`` when the folder cannot be written."""
    from filelock import FileLock

    os.makedirs(folder, exist_ok=True)
    with FileLock(os.path.join(folder, shard_name(key, 0)) + ".lock"):
        on_disk = refresh(folder, key, parts_json, stored)
        _delete_unusable(folder, stored)
        new = [i for i, prompt in enumerate(prompts) if prompt not in on_disk]
        if not new:
            return
        prompts, rows = [prompts[i] for i in new], rows[new] if len(new) < len(prompts) else rows
        merged = _merged_shards(stored, len(prompts))
        for name in merged:
            read = read_shard(os.path.join(folder, name), parts_json, stored.rows.dim, warn=False)
            if read is not None and read[1] is not None:
                prompts, rows = _concatenated(read, (prompts, rows))
        numbers = shard_numbers(folder, key)
        target = min(merged, key=numbers.__getitem__) if merged else shard_name(key, _first_free(numbers.values()))
        stored.shards[target] = (_write_shard(os.path.join(folder, target), parts_json, prompts, rows), len(prompts))
        for name in merged:
            if name != target:
                _remove(os.path.join(folder, name))
                del stored.shards[name]


def _delete_unusable(folder: str, stored: StoredKey) -> None:
    for name, (state, count) in list(stored.shards.items()):
        if count is None and _file_state(os.path.join(folder, name)) == state:
            _remove(os.path.join(folder, name))
            del stored.shards[name]


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # already gone (the cache cleared meanwhile): nothing to remove
        os.remove(path)


def _merged_shards(stored: StoredKey, rows: int) -> list[str]:
    """The usable shards merged into a new one of ``rows`` rows: smallest first, while a shard holds at most
    :data:`MERGE_RATIO` times the rows gathered so far. So each shard holds more than twice the next smaller one,
    and a row is rewritten only into a shard at least 1.5 times the one it was in (see the module docstring)."""
    merged = []
    for name, (_, count) in sorted(
        ((name, shard) for name, shard in stored.shards.items() if shard[1] is not None), key=lambda item: item[1][1]
    ):
        if count > MERGE_RATIO * rows:
            break
        merged.append(name)
        rows += count
    return merged


def _concatenated(first: tuple[list[str], Tensor], second: tuple[list[str], Tensor]) -> tuple[list[str], Tensor]:
    """``first``'s rows, then ``second``'s rows of prompts ``first`` does not hold."""
    known = set(first[0])
    keep = [i for i, prompt in enumerate(second[0]) if prompt not in known]
    return first[0] + [second[0][i] for i in keep], torch.cat([first[1], second[1][keep]])


def _first_free(numbers) -> int:
    used = set(numbers)
    return next(number for number in range(len(used) + 1) if number not in used)


def _write_shard(path: str, parts_json: str, prompts: list[str], rows: Tensor) -> tuple | None:
    """Write one shard atomically (a temporary file renamed onto ``path``); its state."""
    from safetensors.torch import save_file

    rows = rows.to(torch.float32).contiguous()
    ids = [row_id(parts_json, prompt) for prompt in prompts]
    metadata = {
        "key": parts_json,
        "prompts": json.dumps(prompts),
        "rows": json.dumps(ids),
        "sha256": file_digest(parts_json, prompts, ids, rows),
    }
    folder = os.path.dirname(path)
    handle, staging = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".partial")
    os.close(handle)
    try:
        save_file({"embeddings": rows}, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return _file_state(path)


# --------------------------------------------------------------------------------------------------- management
def key_of(name: str) -> str | None:
    """The key whose shard the file ``name`` is (``None``: not a shard)."""
    key = name.split(".", 1)[0]
    return key if _shard_number(name, key) is not None else None


__all__ = [
    "CACHE_FORMAT",
    "MERGE_RATIO",
    "SUFFIX",
    "RowTable",
    "StoredKey",
    "append_rows",
    "file_digest",
    "key_of",
    "read_shard",
    "refresh",
    "row_id",
    "shard_name",
    "shard_numbers",
]
