"""Writing a model or adapter directory safely: a failure midway never leaves a half-written directory.

Layer 1 (like ``core``): plain files, no torch, peft or transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from typing import Any


ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Prefix of the hidden working directory a save makes inside its target (removed when the save ends).
STAGING_PREFIX = ".hf_clip_forget-saving-"

#: Files of a saved adapter or model; other files found in a target directory are the user's and are kept.
_SAVED_FILE_NAMES = (
    "README.md",
    ADAPTER_CONFIG_NAME,
    "adapter_model.safetensors",
    "adapter_model.bin",
    "config.json",
    "generation_config.json",
)
_SAVED_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin.index.json")


def write_directory_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(staging)`` on a fresh directory, then move what it wrote into ``target``, file by file.

    ``target`` is written into, never replaced: a symbolic link to a directory stays a link (the files land in the
    directory it points to), a mount point stays mounted, the directory keeps its mode and owner. A missing
    ``target`` is created (with its missing parents), with the permissions the umask gives.

    * Until ``write`` has returned, nothing in ``target`` changes; if it raises, everything it wrote is discarded
      (and directories this call created are removed) and the error propagates.
    * Each file then replaces its namesake with ``os.replace`` (atomic: a reader sees the old or the new file). A
      replaced file keeps its mode; a new file gets the mode a normal ``open(path, "w")`` would give it. A file
      that was a symbolic link is replaced by the new file; what it pointed to is left alone.
    * If moving fails midway, the files already moved are put back as they were before the error propagates.
    * Only once every new file is in place are the files of an earlier save that this save did not write removed
      (``README.md``, configs, weights, in ``target`` and in adapter subfolders that hold an
      ``adapter_config.json``), so the directory holds one coherent save. Every other file is kept.

    The staging directory is a hidden ``.hf_clip_forget-saving-*`` folder inside ``target`` (same filesystem, so
    every move is a rename); it is removed in all cases.
    """
    directory, created = _make_target(target)
    try:
        root = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
        try:
            staged = os.path.join(root, "new")
            os.mkdir(staged)
            write(staged)
            _install(staged, directory, backup=os.path.join(root, "old"))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    except BaseException:
        _remove_empty_directories(created)
        raise


def _make_target(target: str | os.PathLike) -> tuple[str, list[str]]:
    """``(real path of target, directories created for it, outermost first)``; refuses a non-directory."""
    path = os.path.abspath(os.fspath(target))
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a symbolic link to nothing" if os.path.islink(path) else "a file, not a directory"
        raise ValueError(f"Cannot save into {path!r}: it is {kind}. Nothing was written.")
    created = []
    missing = path
    while not os.path.lexists(missing):
        created.insert(0, missing)
        missing = os.path.dirname(missing)
    os.makedirs(path, exist_ok=True)
    return os.path.realpath(path), created


def _remove_empty_directories(paths: list[str]) -> None:
    for path in reversed(paths):
        try:
            os.rmdir(path)
        except OSError:
            return


def _install(staged: str, directory: str, backup: str) -> None:
    folders, files = _tree(staged)
    _check_conflicts(directory, folders, files)
    file_mode = _new_file_mode(os.path.dirname(staged))
    _move_files(staged, directory, folders, files, backup, file_mode)
    _remove_stale_files(directory, written=set(files))


def _tree(root: str) -> tuple[list[str], list[str]]:
    """Relative paths of the folders (parents first) and files under ``root``."""
    folders, files = [], []
    for current, subfolders, names in os.walk(root):
        relative = os.path.relpath(current, root)
        prefix = "" if relative == "." else relative
        links = [name for name in subfolders if os.path.islink(os.path.join(current, name))]
        folders += [os.path.join(prefix, name) for name in sorted(set(subfolders) - set(links))]
        files += [os.path.join(prefix, name) for name in sorted(names + links)]
    return folders, files


def _check_conflicts(directory: str, folders: list[str], files: list[str]) -> None:
    """Refuse, before anything moves, when a new folder meets an existing file or a new file an existing folder."""
    for path, wanted in [(folder, "folder") for folder in folders] + [(file, "file") for file in files]:
        existing = os.path.join(directory, path)
        if not os.path.lexists(existing) or os.path.isdir(existing) == (wanted == "folder"):
            continue
        found = "folder" if wanted == "file" else "file"
        raise ValueError(
            f"Cannot save into {directory!r}: the save writes a {wanted} {path!r} where there is a {found}. Move "
            "it away and save again; nothing was changed."
        )


def _new_file_mode(scratch: str) -> int:
    """The mode ``open(path, "w")`` gives a new file here (0o666 less the umask), read without touching the umask
    (``os.umask`` sets it process-wide, which is not thread-safe)."""
    probe = os.path.join(scratch, "mode-probe")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.remove(probe)


def _move_files(
    staged: str, directory: str, folders: list[str], files: list[str], backup: str, file_mode: int
) -> None:
    made, moved = [], []
    try:
        for folder in folders:
            path = os.path.join(directory, folder)
            if not os.path.isdir(path):
                os.mkdir(path)  # mode from the umask, like any new folder
                made.append(path)
        for file in files:
            source, destination = os.path.join(staged, file), os.path.join(directory, file)
            existed = os.path.lexists(destination)
            if not os.path.islink(source):  # chmod would follow a link
                os.chmod(source, _mode_for(destination, file_mode))
            if existed:
                _keep_copy(destination, os.path.join(backup, file))
            os.replace(source, destination)
            moved.append((file, existed))
    except BaseException:
        _undo_moves(directory, backup, moved, made)
        raise


def _mode_for(destination: str, new_file_mode: int) -> int:
    """A replaced regular file's mode, as writing into it would keep; otherwise that of a new file."""
    info = os.lstat(destination) if os.path.lexists(destination) else None
    return stat.S_IMODE(info.st_mode) if info and stat.S_ISREG(info.st_mode) else new_file_mode


def _keep_copy(path: str, backup: str) -> None:
    """A copy of ``path`` to restore if the save fails: a hard link where the filesystem allows it (no copying)."""
    os.makedirs(os.path.dirname(backup), exist_ok=True)
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, backup, follow_symlinks=False)


def _undo_moves(directory: str, backup: str, moved: list[tuple[str, bool]], made: list[str]) -> None:
    for file, existed in reversed(moved):
        destination = os.path.join(directory, file)
        if existed:
            os.replace(os.path.join(backup, file), destination)
        else:
            os.remove(destination)
    for folder in reversed(made):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_stale_files(directory: str, written: set[str]) -> None:
    """Remove the saved-model files of an earlier save that this save did not write (see the caller's docs)."""
    stale = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX) or os.path.islink(path):
            continue
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)):
                stale += [os.path.join(name, entry) for entry in os.listdir(path)]
        else:
            stale.append(name)
    for file in stale:
        path = os.path.join(directory, file)
        if file not in written and _is_saved_file(path):
            os.remove(path)
    for folder in {os.path.dirname(file) for file in stale} - {""}:
        _remove_empty_directories([os.path.join(directory, folder)])


def _is_saved_file(path: str) -> bool:
    name = os.path.basename(path)
    is_file = os.path.isfile(path) and not os.path.islink(path)
    return is_file and (name in _SAVED_FILE_NAMES or name.endswith(_SAVED_FILE_SUFFIXES) or _is_torch_shard(name))


def _is_torch_shard(name: str) -> bool:
    return name.startswith("pytorch_model") and name.endswith(".bin")


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
