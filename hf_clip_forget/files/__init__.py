"""Writing a model or adapter directory safely: whenever a save fails or the process is killed, the directory holds
the complete earlier save or the complete new one.

Layer 1 (like ``core``): plain files, no torch, peft or transformers. The steps live in private modules:
``_owned`` (which files belong to a save), ``_exchange`` (swapping whole directories), ``_journal`` (installing
file by file, recoverably) and ``_fs`` (atomic renames, flushing, locking).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from . import _exchange, _fs, _journal
from ._owned import ADAPTER_CONFIG_NAME, STAGING_PREFIX, is_folder


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "STAGING_PREFIX",
    "recover_interrupted_save",
    "rewrite_adapter_configs",
    "write_directory_atomically",
]


def write_directory_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(staging)`` on a fresh folder, then make what it wrote the content of ``target``, all or nothing.

    What the directory holds afterwards: the files ``write`` wrote, plus every entry of the earlier directory that is
    not part of an earlier save (the user's files, folders and links are kept); the files of an earlier save that
    this save did not write (``README.md``, configs, weights, at the top and in adapter subfolders that hold an
    ``adapter_config.json``) are gone, so the directory holds one coherent save. A replaced file's mode is kept; a
    new file gets the mode ``open(path, "w")`` would give it, a new folder the one the umask gives. A file that was
    a symbolic link is replaced by the new file (what it pointed to is left alone). The directory keeps its mode,
    owner and extended attributes; a symbolic link to a directory stays a link (the directory it points to is
    saved into). A missing ``target`` is created, with its missing parents.

    * Until ``write`` has returned, nothing changes; if it raises, what it wrote is discarded, directories this call
      created are removed, and the error propagates. A save that would write a folder where there is a file (or a
      file where there is a folder) is refused before anything changes.
    * **Exchange** (Linux, the usual case): the complete new directory is built as a hidden sibling of the real
      directory (``.<name>.hf_clip_forget-saving-<random>/tree``, the user's entries hard-linked into it, else
      copied), flushed to disk, and swapped with the directory in one ``renameat2(RENAME_EXCHANGE)``; the old
      directory is then removed. A crash at any moment leaves the complete old or the complete new directory at
      ``target`` (a new ``target`` is created by one rename: it is missing or complete), loadable as it is. The
      directory is a new one: a process whose working directory it was, or that watches it, keeps the old one
      (removed); each of the user's files costs a link per save.
    * **Journaled** (a mount point or a directory holding one, this process's working directory or one holding it,
      no ``renameat2`` as on macOS or Windows, a parent this process cannot write to, a directory it could not give
      the same owner, or a filesystem that refuses the exchange): the new files and hard-link backups of every file replaced or removed are staged in a hidden
      ``.hf_clip_forget-saving-*`` folder inside ``target``, a commit marker is written last, then the files
      replace their namesakes one by one (each ``os.replace`` atomic). An exception midway puts the earlier files
      back. After a crash the directory may hold a mix until :func:`recover_interrupted_save` (called by the next
      save, and available to loaders) finishes the install (committed) or discards it (not committed: nothing had
      changed).

    Every save starts with :func:`recover_interrupted_save`, so staging folders of killed saves never pile up.
    Concurrent saves into one directory are not serialized (the last to finish wins).
    """
    path = _checked_target(target)
    if not os.path.isdir(path):
        _create(path, write)
        return
    directory = os.path.realpath(path)
    recover_interrupted_save(directory)
    staging = _sibling_staging(directory) if _exchange_possible(directory) else None
    if staging is None:
        _journal.save(directory, write)
        return
    with staging:
        _exchange.save(directory, staging.path, write)


def recover_interrupted_save(directory: str | os.PathLike) -> list[str]:
    """Clean up after saves into ``directory`` that were killed midway, and return the staging folders dealt with.

    A journal inside ``directory`` (``.hf_clip_forget-saving-*``) is finished where it was committed (the new
    files were all staged: the install is completed) and discarded where it was not (nothing had changed); one
    whose roll-back was interrupted is rolled back (the staging folder of a killed save of an earlier version of this
    package has the files it had replaced put back). A staging folder beside it (``.<name>.hf_clip_forget-saving-*``)
    holds a partial new directory or the complete old one, never the only copy of anything: it is removed. Staging
    folders of saves still running (they hold a lock) and folders holding anything but a save's files are left
    alone. Safe to call at any time, for instance before loading; it writes nothing where there is nothing to do.
    """
    directory = os.path.realpath(os.path.abspath(os.fspath(directory)))
    dealt = []
    if is_folder(directory):
        for name in sorted(os.listdir(directory)):
            staging = os.path.join(directory, name)
            if name.startswith(STAGING_PREFIX) and is_folder(staging):
                if _while_locked(staging, lambda path: _journal.recover(directory, path)):
                    dealt.append(staging)
    parent = os.path.dirname(directory)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        staging = os.path.join(parent, name)
        if _exchange.is_sibling_staging(directory, name) and is_folder(staging):
            if _while_locked(staging, _exchange.discard):
                dealt.append(staging)
    return dealt


def _exchange_possible(directory: str) -> bool:
    """Whether to save into ``directory`` by exchange (see :func:`._exchange.possible`); tests force the journal."""
    return _exchange.possible(directory)


def _sibling_staging(directory: str) -> _fs.StagingFolder | None:
    """A staging folder beside ``directory``, or None where its parent cannot be written to."""
    try:
        return _fs.StagingFolder.create(os.path.dirname(directory), _exchange.sibling_prefix(directory))
    except OSError:
        return None


def _while_locked(staging: str, action: Callable[[str], Any]) -> Any:
    """``action(staging)`` while holding the staging folder's lock; None where a running save holds it."""
    try:
        lock = _fs.lock_folder(staging)
    except OSError:  # locked by a running save, or gone meanwhile
        return None
    try:
        return action(staging)
    finally:
        _fs.unlock(lock)


def _checked_target(target: str | os.PathLike) -> str:
    """``target`` as an absolute path; refuses a file or a link to nothing."""
    path = os.path.abspath(os.fspath(target))
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a symbolic link to nothing" if os.path.islink(path) else "a file, not a directory"
        raise ValueError(f"Cannot save into {path!r}: it is {kind}. Nothing was written.")
    return path


def _create(path: str, write: Callable[[str], None]) -> None:
    """Save into a ``path`` that does not exist yet, creating its missing parents (removed again on failure)."""
    parent = os.path.dirname(path)
    created = []
    missing = parent
    while not os.path.lexists(missing):
        created.insert(0, missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(parent, exist_ok=True)
        directory = os.path.join(os.path.realpath(parent), os.path.basename(path))
        recover_interrupted_save(directory)
        with _fs.StagingFolder.create(os.path.dirname(directory), _exchange.sibling_prefix(directory)) as staging:
            _exchange.create(directory, staging.path, write)
    except BaseException:
        _fs.remove_empty_directories(created)
        raise


def rewrite_adapter_configs(directory: str, key: str, value_of: Callable[[Any], Any]) -> None:
    """Set ``key`` to ``value_of(current value)`` in every ``adapter_config.json`` below ``directory`` (written as
    peft writes them: indented, keys sorted); files whose value does not change are left as they are."""
    for folder, _, names in os.walk(directory):
        if ADAPTER_CONFIG_NAME not in names:
            continue
        path = os.path.join(folder, ADAPTER_CONFIG_NAME)
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        value = value_of(config.get(key))
        if config.get(key) != value:
            config[key] = value
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
