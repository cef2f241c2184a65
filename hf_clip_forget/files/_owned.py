"""Which files belong to a save (and which are the user's), and the checks made before a save changes anything."""

from __future__ import annotations

import os
import stat


ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Prefix of the hidden working folder of a save: inside the target (journaled saves), or after ``.<target name>.``
#: beside it (saves that exchange the directory). Removed when the save ends, or by the next save if it was killed.
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


def staged_tree(root: str) -> tuple[list[str], list[str]]:
    """Relative paths of the folders (parents first) and files (links included) under ``root``."""
    folders, files = [], []
    for current, subfolders, names in os.walk(root):
        relative = os.path.relpath(current, root)
        prefix = "" if relative == "." else relative
        links = [name for name in subfolders if os.path.islink(os.path.join(current, name))]
        subfolders[:] = sorted(set(subfolders) - set(links))
        folders += [os.path.join(prefix, name) for name in subfolders]
        files += [os.path.join(prefix, name) for name in sorted(names + links)]
    return folders, files


def is_folder(path: str) -> bool:
    """A directory, not a link to one."""
    return os.path.isdir(path) and not os.path.islink(path)


def check_conflicts(directory: str, folders: list[str], files: list[str]) -> None:
    """Refuse, before anything changes, when a new folder meets an existing file or link, or a new file an existing
    folder (a link where a file is written is replaced; what it points to is left alone)."""
    for path, wanted in [(folder, "folder") for folder in folders] + [(file, "file") for file in files]:
        existing = os.path.join(directory, path)
        if not os.path.lexists(existing) or is_folder(existing) == (wanted == "folder"):
            continue
        found = "folder" if wanted == "file" else ("link" if os.path.islink(existing) else "file")
        raise ValueError(
            f"Cannot save into {directory!r}: the save writes a {wanted} {path!r} where there is a {found}. Move "
            "it away and save again; nothing was changed."
        )


def new_file_mode(scratch: str) -> int:
    """The mode ``open(path, "w")`` gives a new file here (0o666 less the umask), read without touching the umask
    (``os.umask`` sets it process-wide, which is not thread-safe)."""
    probe = os.path.join(scratch, "mode-probe")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.remove(probe)


def set_staged_modes(staged: str, directory: str, files: list[str], file_mode: int) -> None:
    """Give each staged file the mode of the regular file it replaces in ``directory`` (as writing into it would
    keep), or else that of a new file."""
    for file in files:
        source, destination = os.path.join(staged, file), os.path.join(directory, file)
        if os.path.islink(source):  # chmod would follow a link
            continue
        info = os.lstat(destination) if os.path.lexists(destination) else None
        os.chmod(source, stat.S_IMODE(info.st_mode) if info and stat.S_ISREG(info.st_mode) else file_mode)


def stale_files(directory: str, written: set[str]) -> list[str]:
    """The files of an earlier save that a save writing ``written`` leaves out, relative to ``directory``: saved-model
    files (README.md, configs, weights) at the top and in adapter subfolders (those holding an
    ``adapter_config.json``) that this save does not write. Links and every other file are the user's."""
    candidates = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX) or os.path.islink(path):
            continue
        if os.path.isdir(path):
            if is_adapter_folder(path):
                candidates += [os.path.join(name, entry) for entry in sorted(os.listdir(path))]
        else:
            candidates.append(name)
    return [file for file in candidates if file not in written and is_saved_file(os.path.join(directory, file))]


def is_adapter_folder(path: str) -> bool:
    return is_folder(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def is_saved_file(path: str) -> bool:
    name = os.path.basename(path)
    is_file = os.path.isfile(path) and not os.path.islink(path)
    return is_file and (name in _SAVED_FILE_NAMES or name.endswith(_SAVED_FILE_SUFFIXES) or _is_torch_shard(name))


def _is_torch_shard(name: str) -> bool:
    return name.startswith("pytorch_model") and name.endswith(".bin")
