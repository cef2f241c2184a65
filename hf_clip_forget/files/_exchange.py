"""Saving by exchanging whole directories (Linux): the new directory is built complete beside the target, then the
two are swapped in one atomic step (``renameat2(RENAME_EXCHANGE)``). Whatever moment a crash comes at, the target
path holds the complete old directory or the complete new one."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable

from . import _fs, _journal
from ._owned import (
    STAGING_PREFIX,
    check_conflicts,
    is_adapter_folder,
    is_folder,
    new_file_mode,
    set_staged_modes,
    staged_tree,
    stale_files,
)


#: The folder of a staging folder that becomes the new directory (and, after the exchange, holds the old one).
TREE = "tree"
_STAGING_ENTRIES = {TREE, "mode-probe"}
#: Errors that mean "this directory cannot be exchanged here" rather than "the disk failed": the save then goes on
#: file by file, journaled.
CANNOT_EXCHANGE = {
    errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBUSY, errno.EPERM, errno.EACCES, errno.ENOTSUP,
    errno.EOPNOTSUPP, errno.EMLINK,
}  # fmt: skip


def possible(directory: str) -> bool:
    """Whether ``directory`` can be exchanged: ``renameat2`` exists, neither the directory nor anything inside it is
    a mount point or this process's working directory (either would stay with the old directory), and a new
    directory can be given its owner (this process owns it, or is root)."""
    if not _fs.renameat2_available() or os.path.ismount(directory) or _fs.mount_points_at_or_under(directory):
        return False
    if _is_at_or_under(_working_directory(), directory):
        return False
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return True
    info = os.stat(directory)
    return info.st_uid == os.geteuid() and info.st_gid in {os.getegid(), *os.getgroups()}


def _working_directory() -> str | None:
    try:
        return os.path.realpath(os.getcwd())
    except OSError:
        return None


def _is_at_or_under(path: str | None, directory: str) -> bool:
    return path is not None and (path == directory or path.startswith(directory.rstrip(os.sep) + os.sep))


def sibling_prefix(directory: str) -> str:
    """``.<name>.hf_clip_forget-saving-``: the staging folders beside ``directory`` start with it, then 12 random
    hex digits (a long name is replaced by its hash, to stay within the length a name may have)."""
    name = os.path.basename(directory)
    if len(os.fsencode(name)) > 200:
        name = "sha256-" + hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{name}{STAGING_PREFIX}"


def is_sibling_staging(directory: str, name: str) -> bool:
    """Whether ``name`` (in the parent of ``directory``) is a staging folder of a save into ``directory``."""
    prefix = sibling_prefix(directory)
    return name.startswith(prefix) and re.fullmatch("[0-9a-f]{12}", name[len(prefix) :]) is not None


def discard(staging: str) -> str | None:
    """Remove a staging folder left beside the target by a killed save: it holds a partial new directory (killed
    before the exchange) or the complete old one (killed after); the target is complete either way. A folder holding
    anything else is not ours and is left alone (None)."""
    if not set(os.listdir(staging)) <= _STAGING_ENTRIES:
        return None
    _fs.remove_tree(staging)
    return "removed"


def save(directory: str, staging: str, write: Callable[[str], None]) -> None:
    """Write the new save in ``staging/tree``, complete it with the user's entries of ``directory``, and exchange it
    with ``directory``; the old directory ends in ``staging/tree`` (removed with the staging folder). Where the
    exchange turns out impossible (see :data:`CANNOT_EXCHANGE`), nothing has changed and the staged files are
    installed journaled instead (:func:`._journal.install_staged`)."""
    tree = os.path.join(staging, TREE)
    os.mkdir(tree)
    write(tree)
    folders, files = staged_tree(tree)
    check_conflicts(directory, folders, files)
    set_staged_modes(tree, directory, files, new_file_mode(staging))
    try:
        copied = _carry_unowned(directory, tree, set(files))
        _fs.sync_tree(tree, files + copied)
        _fs.renameat2(tree, directory, _fs.RENAME_EXCHANGE)
    except OSError as error:
        if error.errno not in CANNOT_EXCHANGE:
            raise
        _journal.install_staged(directory, tree, folders, files)
        return
    _fs.fsync_path(os.path.dirname(directory))


def create(directory: str, staging: str, write: Callable[[str], None]) -> None:
    """Write a save into ``staging/tree`` and rename it to ``directory``, which does not exist: a crash leaves no
    ``directory`` or the complete one. Folders get the mode the umask gives, files that of ``open(path, "w")``."""
    tree = os.path.join(staging, TREE)
    os.mkdir(tree)  # mode from the umask, like any new folder
    write(tree)
    _, files = staged_tree(tree)
    set_staged_modes(tree, directory, files, new_file_mode(staging))
    _fs.sync_tree(tree, files)
    _fs.rename_no_replace(tree, directory)
    _fs.fsync_path(os.path.dirname(directory))


def _carry_unowned(directory: str, tree: str, written: set[str]) -> list[str]:
    """Hard-link (else copy) into ``tree`` every entry of ``directory`` that the save neither writes nor drops as
    stale (:func:`._owned.stale_files`): the user's files, folders and links, at any depth. Every folder of ``tree``
    that exists in ``directory`` then gets its mode, owner and extended attributes (carried folders their times too),
    and ``tree`` those of ``directory``. Returns the files it copied. Changes nothing in ``directory``."""
    dropped = written | set(stale_files(directory, written))
    copied, carried = [], set()
    for current, subfolders, names in os.walk(directory, onerror=_raise):  # an unreadable folder is not skipped
        relative = os.path.relpath(current, directory)
        prefix = "" if relative == "." else relative
        links = [name for name in subfolders if os.path.islink(os.path.join(current, name))]
        subfolders[:] = sorted(set(subfolders) - set(links))
        for name in subfolders:  # an adapter folder of the old save is kept only if something is left in it
            if prefix or not is_adapter_folder(os.path.join(current, name)):
                _make_folder(tree, os.path.join(prefix, name), carried)
        for name in sorted(names + links):
            file = os.path.join(prefix, name)
            if file not in dropped:
                _make_folder(tree, prefix, carried)
                if _fs.link_or_copy(os.path.join(current, name), os.path.join(tree, file), keep_owner=True):
                    copied.append(file)
    kept = [folder for folder in staged_tree(tree)[0] if is_folder(os.path.join(directory, folder))]
    for folder in sorted(kept, key=lambda path: path.count(os.sep), reverse=True):
        _fs.copy_attributes(os.path.join(directory, folder), os.path.join(tree, folder), times=folder in carried)
    _fs.copy_attributes(directory, tree)
    return copied


def _raise(error: OSError) -> None:
    raise error


def _make_folder(tree: str, folder: str, carried: set[str]) -> None:
    if not folder or os.path.isdir(os.path.join(tree, folder)):
        return
    _make_folder(tree, os.path.dirname(folder), carried)
    os.mkdir(os.path.join(tree, folder), 0o700)  # the old folder's mode is given once it is filled
    carried.add(folder)
