"""Filesystem steps the save is built from, each with the guarantee it gives: atomic renames (``renameat2``),
durable writes (``fsync``), staging folders locked while in use, links instead of copies.

Every call that changes the filesystem goes through the ``os`` and ``fcntl`` modules and :func:`renameat2` as module
attributes, so that tests can fail each one in turn.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys


try:
    import fcntl
except ImportError:  # not on Windows: staging folders are then not locked
    fcntl = None


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSET = object()
_renameat2_function = _UNSET
_LINK_CAN_SKIP_LINKS = os.link in os.supports_follow_symlinks


def _libc_renameat2():
    """``renameat2`` of the C library (Linux, glibc >= 2.28 or musl >= 1.2.5), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def renameat2_available() -> bool:
    global _renameat2_function
    if _renameat2_function is _UNSET:
        _renameat2_function = _libc_renameat2()
    return _renameat2_function is not None


def renameat2(source: str, destination: str, flags: int) -> None:
    """``renameat2(2)``: with :data:`RENAME_EXCHANGE`, swap two paths in one atomic step (both must exist); with
    :data:`RENAME_NOREPLACE`, rename unless ``destination`` exists. Raises ``OSError`` (``ENOSYS`` where the call is
    missing, ``EINVAL`` where the filesystem lacks the flag, ``EXDEV`` across filesystems, ``EBUSY`` on a mount
    point)."""
    if not renameat2_available():
        raise OSError(errno.ENOSYS, "renameat2 is not available here", source)
    if _renameat2_function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), source, None, destination)


def rename_no_replace(source: str, destination: str) -> None:
    """Rename ``source`` to ``destination`` atomically, refusing (``FileExistsError``) where ``destination`` exists;
    where ``renameat2`` cannot refuse by itself, a check just before ``os.rename`` (a race with another creator can
    then replace an empty directory)."""
    try:
        renameat2(source, destination, RENAME_NOREPLACE)
        return
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, "Appeared while saving; nothing was written into it", destination)
    os.rename(source, destination)


def fsync_path(path: str) -> None:
    """Flush a regular file's data, or a directory's entries, to disk."""
    if os.name == "nt" and os.path.isdir(path):
        return  # directories cannot be opened on Windows; their entries are durable with the files
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(root: str, files: list[str]) -> None:
    """Flush ``files`` (relative to ``root``; links skipped) and then every directory under ``root``, deepest first,
    so that the whole tree is on disk before it is made visible."""
    for file in files:
        path = os.path.join(root, file)
        if os.path.isfile(path) and not os.path.islink(path):
            fsync_path(path)
    for current, _, _ in os.walk(root, topdown=False):
        fsync_path(current)


def write_durably(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` in one atomic step: written and flushed under a temporary name, renamed, and
    the rename flushed. A reader (or a crash) sees no file or the complete one."""
    temporary = path + ".tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.rename(temporary, path)
    fsync_path(os.path.dirname(path))


def link_or_copy(source: str, destination: str, keep_owner: bool = False) -> bool:
    """Give ``destination`` the content of ``source`` (a link is linked or copied as a link, never followed): a hard
    link where the filesystem allows (no copying, the same file), otherwise a copy with mode, times and extended
    attributes. Returns whether it copied. With ``keep_owner`` (carrying the user's files into a new directory), the
    link's error is raised instead of copying a file across mounts (``EXDEV``) or one that a copy would give
    another owner (one this process neither owns nor can chown)."""
    try:
        if _LINK_CAN_SKIP_LINKS:
            os.link(source, destination, follow_symlinks=False)
        else:
            os.link(source, destination)  # Windows: links are copied below
        return False
    except OSError as error:
        info = os.lstat(source)
        copyable = stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)
        foreign = not _is_root() and hasattr(os, "geteuid") and info.st_uid != os.geteuid()
        if not copyable or (keep_owner and (error.errno == errno.EXDEV or foreign)):
            raise
    shutil.copy2(source, destination, follow_symlinks=False)
    if keep_owner and _is_root():
        os.chown(destination, info.st_uid, info.st_gid, follow_symlinks=False)
    return True


def move_or_copy(source: str, destination: str) -> None:
    """Rename ``source`` to ``destination``; across filesystems, copy it (mode, times, attributes kept)."""
    try:
        os.rename(source, destination)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.copy2(source, destination, follow_symlinks=False)


def copy_attributes(source: str, destination: str, times: bool = False) -> None:
    """Give the directory ``destination`` the mode, owner, extended attributes (ACLs included) and, with ``times``,
    the access and modification times of ``source``. Raises ``PermissionError`` where the owner cannot be given."""
    info = os.lstat(source)
    current = os.lstat(destination)
    if (current.st_uid, current.st_gid) != (info.st_uid, info.st_gid):
        os.chown(destination, info.st_uid, info.st_gid, follow_symlinks=False)
    _copy_extended_attributes(source, destination)
    os.chmod(destination, stat.S_IMODE(info.st_mode))
    if times:
        os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def _copy_extended_attributes(source: str, destination: str) -> None:
    if not hasattr(os, "listxattr"):
        return
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(destination, name, os.getxattr(source, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EINVAL):
                raise


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it, never following links (folders without write permission are made
    writable first); errors are ignored: a staging folder left behind is removed by the next save."""

    def retry_writable(function, failed, error):
        if not isinstance(error[1] if isinstance(error, tuple) else error, PermissionError):
            return
        parent = os.path.dirname(failed)
        try:
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=retry_writable)


def remove_empty_directories(paths: list[str]) -> None:
    """Remove ``paths`` (outermost first) from the innermost out, stopping at the first that is not empty."""
    for path in reversed(paths):
        try:
            os.rmdir(path)
        except OSError:
            return


class StagingFolder:
    """A hidden working folder of one save: made with a fresh random name (mode 0o700), locked (``flock``) while the
    save runs so that another save's clean-up leaves it alone, and removed when the ``with`` block ends unless
    ``keep`` is set (a journal that still has to be finished)."""

    def __init__(self, path: str, lock: int | None) -> None:
        self.path, self._lock, self.keep = path, lock, False

    @classmethod
    def create(cls, parent: str, prefix: str) -> StagingFolder:
        """A new staging folder ``parent/prefix<12 random hex digits>``, locked. Another save's clean-up can remove
        it in the instant between its creation and its locking: then it is made again under another name."""
        while True:
            path = os.path.join(parent, prefix + secrets.token_hex(6))
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            try:
                lock = lock_folder(path, wait=True)
            except FileNotFoundError:
                continue
            except BaseException:
                _remove_quietly(path)
                raise
            if lock is None or _still_at(lock, path):
                return cls(path, lock)
            unlock(lock)

    def __enter__(self) -> StagingFolder:
        return self

    def __exit__(self, *_) -> None:
        try:
            if not self.keep:
                remove_tree(self.path)
        finally:
            unlock(self._lock)


def lock_folder(path: str, wait: bool = False) -> int | None:
    """An exclusive ``flock`` on the folder ``path``, held until :func:`unlock` (or the process ends, however it
    ends). Returns its descriptor; raises ``BlockingIOError`` where another process holds it and ``wait`` is false;
    returns None where locks are not supported."""
    if fcntl is None:
        return None
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _still_at(descriptor: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.lstat(path))
    except FileNotFoundError:
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def unlock(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)


def mount_points_at_or_under(directory: str) -> list[str]:
    """The mount points (bind mounts included, which ``os.path.ismount`` misses) at ``directory`` or below it, read
    from ``/proc/self/mountinfo``; empty where that file does not exist (not Linux)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    inside = directory.rstrip(os.sep) + os.sep
    points = [_unescape_mount_point(line.split(" ")[4]) for line in lines if line.count(" ") >= 4]
    return [point for point in points if point == directory or point.startswith(inside)]


def _unescape_mount_point(field: str) -> str:
    """``/proc/self/mountinfo`` writes space, tab, newline and backslash as octal escapes (``\\040``...)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
