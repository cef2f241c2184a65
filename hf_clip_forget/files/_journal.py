"""Saving file by file, journaled: where a directory cannot be exchanged whole (a mount point, no ``renameat2``, a
parent this process cannot write to), the new files are moved in one by one (each ``os.replace`` atomic). A journal
(a hidden staging folder inside the target) makes the whole install recoverable:

1. ``tree/`` holds the complete new set of files and ``old/`` a hard link (else a copy) of every file the save
   replaces or removes, all flushed to disk, before anything in the target changes;
2. ``plan.json`` (written atomically, last) lists the files to install, the folders to create and the stale files to
   remove: it is the commit point;
3. the files are moved in and the stale ones removed; a failure (an exception) writes ``undo`` and puts every backup
   back.

A save killed before step 2 changed nothing (the journal is discarded); after it, the next save (or
:func:`hf_clip_forget.files.recover_interrupted_save`) finishes the install (``plan.json``, no ``undo``) or the
roll-back (``undo``). Between the crash and that recovery, the target may hold a mix of old and new files.
"""

from __future__ import annotations

import json
import os

from . import _fs
from ._owned import (
    STAGING_PREFIX,
    check_conflicts,
    is_folder,
    is_saved_file,
    new_file_mode,
    set_staged_modes,
    staged_tree,
    stale_files,
)


TREE, BACKUP, PLAN, UNDO = "tree", "old", "plan.json", "undo"
#: What a journal may hold (``new`` and ``mode-probe``: staging folders of earlier versions, never committed).
_JOURNAL_ENTRIES = {TREE, BACKUP, PLAN, PLAN + ".tmp", UNDO, UNDO + ".tmp", "new", "mode-probe"}


def save(directory: str, write) -> None:
    """Run ``write`` on a staging folder inside ``directory`` and install what it wrote, journaled."""
    with _fs.StagingFolder.create(directory, STAGING_PREFIX) as journal:
        tree = os.path.join(journal.path, TREE)
        os.mkdir(tree)
        write(tree)
        folders, files = staged_tree(tree)
        check_conflicts(directory, folders, files)
        set_staged_modes(tree, directory, files, new_file_mode(journal.path))
        _install(directory, journal, folders, files)


def install_staged(directory: str, staged: str, folders: list[str], files: list[str]) -> None:
    """Install, journaled, files already staged (and checked) elsewhere on ``directory``'s filesystem or another:
    they are moved (else copied) into a journal inside ``directory`` first."""
    with _fs.StagingFolder.create(directory, STAGING_PREFIX) as journal:
        tree = os.path.join(journal.path, TREE)
        os.mkdir(tree)
        for folder in folders:
            os.mkdir(os.path.join(tree, folder))
        for file in files:
            _fs.move_or_copy(os.path.join(staged, file), os.path.join(tree, file))
        _install(directory, journal, folders, files)


def recover(directory: str, journal: str) -> str | None:
    """Deal with the journal of an interrupted save into ``directory``: discard it if it was never committed (the
    target was not changed), else finish the install or the roll-back it records. Returns what it did, or None (and
    leaves the folder alone) for a folder that is not a journal of ours or whose plan is unreadable or unsafe."""
    entries = set(os.listdir(journal))
    if not entries <= _JOURNAL_ENTRIES:
        return None
    if PLAN not in entries:
        action = "discarded"
        if "new" in entries and TREE not in entries:
            _put_back_legacy_backups(directory, os.path.join(journal, BACKUP))
            action = "rolled back"
        _fs.remove_tree(journal)
        return action
    plan = _read_plan(os.path.join(journal, PLAN), directory)
    if plan is None:
        return None
    if UNDO in entries:
        _roll_back(directory, journal, plan)
        action = "rolled back"
    else:
        _roll_forward(directory, journal, plan)
        _remove_emptied_folders(directory, plan)
        action = "finished"
    _fs.remove_tree(journal)
    return action


def _install(directory: str, journal: _fs.StagingFolder, folders: list[str], files: list[str]) -> None:
    plan = {
        "folders": [folder for folder in folders if not is_folder(os.path.join(directory, folder))],
        "files": files,
        "stale": stale_files(directory, set(files)),
    }
    replaced = [file for file in files if os.path.lexists(os.path.join(directory, file))]
    copied = _back_up(directory, os.path.join(journal.path, BACKUP), replaced + plan["stale"])
    _fs.sync_tree(journal.path, [os.path.join(TREE, file) for file in files] + copied)
    _fs.write_durably(os.path.join(journal.path, PLAN), json.dumps(plan, indent=1).encode())  # the commit point
    try:
        _roll_forward(directory, journal.path, plan)
    except BaseException:
        journal.keep = True  # until the roll-back is complete; else the next save finishes it
        _fs.write_durably(os.path.join(journal.path, UNDO), b"")
        _roll_back(directory, journal.path, plan)
        journal.keep = False
        raise
    _remove_emptied_folders(directory, plan)


def _back_up(directory: str, backup: str, files: list[str]) -> list[str]:
    """A hard link (else a copy) in ``backup`` of each of ``files``, to put back if the install is undone. Returns
    the copies (relative to the journal), to flush."""
    copied = []
    for file in files:
        os.makedirs(os.path.dirname(os.path.join(backup, file)), exist_ok=True)
        if _fs.link_or_copy(os.path.join(directory, file), os.path.join(backup, file)):
            copied.append(os.path.join(BACKUP, file))
    return copied


def _roll_forward(directory: str, journal: str, plan: dict) -> None:
    """Create the plan's folders, move in each staged file not moved yet, remove the stale files; flush. Repeatable:
    run again after a crash, it finishes what is left."""
    for folder in plan["folders"]:
        if not os.path.isdir(os.path.join(directory, folder)):
            os.mkdir(os.path.join(directory, folder))  # mode from the umask, like any new folder
    for file in plan["files"]:
        source = os.path.join(journal, TREE, file)
        if os.path.lexists(source):
            os.replace(source, os.path.join(directory, file))
    for file in plan["stale"]:
        if is_saved_file(os.path.join(directory, file)):
            os.remove(os.path.join(directory, file))
    _sync_folders(directory, plan)


def _roll_back(directory: str, journal: str, plan: dict) -> None:
    """Put every backup back, remove the new files moved in and the folders created; flush. Repeatable."""
    new_files = set(plan["files"])
    for file in reversed(plan["files"] + plan["stale"]):
        backup, destination = os.path.join(journal, BACKUP, file), os.path.join(directory, file)
        if os.path.lexists(backup):
            os.replace(backup, destination)  # a no-op where it was never moved (the same file)
        elif file in new_files and not os.path.lexists(os.path.join(journal, TREE, file)):
            if os.path.lexists(destination):
                os.remove(destination)  # a file the save added
    for folder in reversed(plan["folders"]):
        _fs.remove_empty_directories([os.path.join(directory, folder)])
    _sync_folders(directory, plan)


def _sync_folders(directory: str, plan: dict) -> None:
    folders = {os.path.dirname(file) for file in plan["files"] + plan["stale"]} | {""}
    for folder in sorted(folders, reverse=True):
        if os.path.isdir(os.path.join(directory, folder)):
            _fs.fsync_path(os.path.join(directory, folder))


def _remove_emptied_folders(directory: str, plan: dict) -> None:
    """Remove the adapter folders of an earlier save that the stale files leave empty (errors ignored: this is
    tidying, after the install is complete)."""
    for folder in sorted({os.path.dirname(file) for file in plan["stale"]} - {""}, reverse=True):
        _fs.remove_empty_directories([os.path.join(directory, folder)])


def _put_back_legacy_backups(directory: str, backup: str) -> None:
    """Undo what a killed save of an earlier version of this package (``new/`` and ``old/``, no plan) had replaced:
    it made each backup in ``old/`` just before replacing the file. Files that save added are left."""
    for current, _, names in os.walk(backup):
        for name in names:
            file = os.path.relpath(os.path.join(current, name), backup)
            if _is_safe(directory, file) and os.path.isdir(os.path.dirname(os.path.join(directory, file))):
                os.replace(os.path.join(current, name), os.path.join(directory, file))


def _read_plan(path: str, directory: str) -> dict | None:
    """The plan, or None where it is unreadable or names a path that leaves ``directory`` (absolute, ``..``,
    through a link) or enters a staging folder: a recovery never touches anything outside the target."""
    try:
        with open(path, encoding="utf-8") as handle:
            plan = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or set(plan) != {"folders", "files", "stale"}:
        return None
    if not all(isinstance(value, list) for value in plan.values()):
        return None
    paths = [path for value in plan.values() for path in value]
    return plan if all(isinstance(path, str) and _is_safe(directory, path) for path in paths) else None


def _is_safe(directory: str, relative: str) -> bool:
    parts = relative.split(os.sep)
    if os.path.isabs(relative) or (os.altsep and os.altsep in relative) or os.path.normpath(relative) != relative:
        return False
    if any(part in ("", ".", "..") or part.startswith(STAGING_PREFIX) for part in parts):
        return False
    return not any(os.path.islink(os.path.join(directory, *parts[:index])) for index in range(1, len(parts)))
