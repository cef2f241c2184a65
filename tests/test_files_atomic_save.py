"""Saving keeps what the target is (issue 10, item 9): a link stays a link, a mount point stays mounted, the
directory keeps its mode, owner and attributes, the user's files survive, and a failed save changes nothing. The
whole directory is exchanged in one step where it can be, else files are installed one by one, journaled (crashes:
tests/test_save_crash.py)."""

import contextlib
import os
import stat
import subprocess

import pytest

from hf_clip_forget import files
from hf_clip_forget.files import STAGING_PREFIX, write_directory_atomically


def writer(files: dict[str, bytes], fail_after: int | None = None):
    """A ``write(staging)`` that writes ``files`` (relative path → bytes), raising after ``fail_after`` of them."""

    def write(staging: str) -> None:
        for index, (name, data) in enumerate(files.items()):
            if index == fail_after:
                raise OSError("disk full")
            path = os.path.join(staging, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)

    return write


def contents(directory) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


FIRST = {
    "adapter_config.json": b"first config",
    "adapter_model.safetensors": b"first weights",
    "b/adapter_config.json": b"b",
}
SECOND = {
    "adapter_config.json": b"second config",
    "adapter_model.safetensors": b"second weights",
    "c/adapter_config.json": b"c",
}


def test_a_symlinked_target_stays_a_link_and_its_directory_receives_the_files(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    write_directory_atomically(link, writer(FIRST))
    write_directory_atomically(link, writer(SECOND))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert contents(real) == SECOND  # the earlier save's `b/` adapter is gone, the new one in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no `.replaced-*` or staging left


def test_an_existing_directory_keeps_its_mode_and_the_users_files(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    target.chmod(0o751)
    (target / "notes.txt").write_text("mine")
    write_directory_atomically(target, writer(FIRST))
    write_directory_atomically(target, writer(SECOND))
    assert mode(target) == 0o751
    assert (target / "notes.txt").read_text() == "mine"
    assert contents(target) == {**SECOND, "notes.txt": b"mine"}


def test_new_files_and_folders_get_the_modes_the_umask_gives(tmp_path):
    target = tmp_path / "new" / "deeper" / "adapter"  # missing parents are created too
    with umask(0o027):
        write_directory_atomically(target, writer(FIRST))
    assert contents(target) == FIRST
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", target, target / "b"):
        assert mode(folder) == 0o750, folder
    for file in ("adapter_config.json", "adapter_model.safetensors", "b/adapter_config.json"):
        assert mode(target / file) == 0o640, file


def test_a_replaced_file_keeps_its_mode(tmp_path):
    write_directory_atomically(tmp_path, writer(FIRST))
    (tmp_path / "adapter_config.json").chmod(0o600)
    write_directory_atomically(tmp_path, writer(SECOND))
    assert mode(tmp_path / "adapter_config.json") == 0o600
    assert (tmp_path / "adapter_config.json").read_bytes() == b"second config"


def test_a_failure_while_writing_leaves_the_previous_files_byte_identical(tmp_path):
    target = tmp_path / "adapter"
    write_directory_atomically(target, writer(FIRST))
    (target / "notes.txt").write_text("mine")
    before = contents(target)
    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(target, writer(SECOND, fail_after=2))
    assert contents(target) == before
    assert not [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_a_failure_while_moving_puts_the_previous_files_back(tmp_path, monkeypatch):
    """The journaled install (used where the directory cannot be exchanged whole) undoes a failure midway."""
    monkeypatch.setattr(files, "_exchange_possible", lambda directory: False)
    write_directory_atomically(tmp_path, writer(FIRST))
    before = contents(tmp_path)
    real_replace, calls = os.replace, []

    def failing_replace(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("I/O error")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="I/O error"):
        write_directory_atomically(tmp_path, writer(SECOND))
    monkeypatch.setattr(os, "replace", real_replace)
    assert contents(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "b"]


def test_a_failed_save_into_a_new_path_leaves_nothing_behind(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(tmp_path / "new" / "adapter", writer(SECOND, fail_after=1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_target_that_is_not_a_directory_is_refused(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("a file")
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="Cannot save into .*Nothing was written"):
        write_directory_atomically(target, writer(FIRST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_file_where_the_save_needs_a_folder_is_refused_before_anything_changes(tmp_path):
    (tmp_path / "b").write_text("the user's file named b")
    (tmp_path / "adapter_config.json").write_text("old")
    with pytest.raises(ValueError, match="writes a folder 'b' where there is a file"):
        write_directory_atomically(tmp_path, writer(FIRST))
    assert contents(tmp_path) == {"adapter_config.json": b"old", "b": b"the user's file named b"}


def test_a_file_that_is_a_link_is_replaced_and_what_it_pointed_to_is_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(b"someone else's file")
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").symlink_to(elsewhere)
    write_directory_atomically(target, writer(FIRST))
    assert not (target / "adapter_config.json").is_symlink()
    assert (target / "adapter_config.json").read_bytes() == b"first config"
    assert elsewhere.read_bytes() == b"someone else's file"


def test_a_mount_point_is_written_into(tmp_path):
    mount_point = tmp_path / "mounted"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        write_directory_atomically(mount_point, writer(FIRST))  # renaming a mount point fails with EBUSY
        write_directory_atomically(mount_point, writer(SECOND))
        assert contents(mount_point) == SECOND
        assert os.path.ismount(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_save_pretrained_into_a_symlinked_directory(tmp_path, tokenizer):
    from hf_clip_forget import ForgetPeftModel
    from hf_clip_forget.testing_utils import tiny_clip

    real = tmp_path / "real"
    real.mkdir()
    real.chmod(0o755)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model = tiny_clip().add_forget_adapter(["cat"], tokenizer=tokenizer, show_progress=False)
    model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and mode(real) == 0o755
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(real))
    reloaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "link")
    assert reloaded.forgotten_classes == {"default": ["cat"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_the_users_files_folders_and_links_are_kept_as_the_same_files(tmp_path):
    target = tmp_path / "adapter"
    write_directory_atomically(target, writer(FIRST))
    (target / "data" / "empty").mkdir(parents=True)
    (target / "data" / "table.csv").write_text("1,2")
    (target / "data").chmod(0o700)
    (target / "b" / "notes.txt").write_text("about b")  # in an adapter folder the new save no longer writes
    (target / "latest").symlink_to("adapter_model.safetensors")
    inode = os.stat(target / "data" / "table.csv").st_ino
    write_directory_atomically(target, writer(SECOND))
    kept = {"data/table.csv": b"1,2", "b/notes.txt": b"about b", "latest": b"second weights"}  # the link is read
    assert contents(target) == {**SECOND, **kept}
    assert (target / "data" / "empty").is_dir() and mode(target / "data") == 0o700
    assert os.readlink(target / "latest") == "adapter_model.safetensors"
    assert os.stat(target / "data" / "table.csv").st_ino == inode  # hard-linked, not copied


def test_the_directory_keeps_its_owner_and_extended_attributes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a directory another owner needs root")
    target = tmp_path / "adapter"
    write_directory_atomically(target, writer(FIRST))
    os.chown(target, 12345, 23456)
    try:
        os.setxattr(target, "user.origin", b"mine")
    except OSError:
        pytest.skip("this filesystem has no user extended attributes")
    write_directory_atomically(target, writer(SECOND))
    info = os.stat(target)
    assert (info.st_uid, info.st_gid) == (12345, 23456)
    assert os.getxattr(target, "user.origin") == b"mine"


def test_a_mount_inside_the_target_stays_mounted_and_untouched(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "kept.txt").write_text("kept")
    target = tmp_path / "adapter"
    write_directory_atomically(target, writer(FIRST))
    (target / "mounted").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(elsewhere), str(target / "mounted")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        write_directory_atomically(target, writer(SECOND))  # the same filesystem: os.path.ismount cannot tell
        assert (target / "mounted" / "sub" / "kept.txt").read_text() == "kept"
        with open("/proc/self/mountinfo") as handle:
            assert f" {target / 'mounted'} " in handle.read()
        assert contents(target) == {**SECOND, "mounted/sub/kept.txt": b"kept"}
    finally:
        subprocess.run(["umount", str(target / "mounted")], check=True)
    assert (elsewhere / "sub" / "kept.txt").read_text() == "kept"


def test_a_target_with_a_long_name(tmp_path):
    target = tmp_path / ("a" * 240)
    write_directory_atomically(target, writer(FIRST))
    write_directory_atomically(target, writer(SECOND))
    assert contents(target) == SECOND and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_save_merged_pretrained_replaces_the_model_and_keeps_the_users_files(tmp_path, tokenizer):
    from transformers import CLIPModel

    from hf_clip_forget.testing_utils import tiny_clip

    target = tmp_path / "merged"
    tiny_clip().add_forget_adapter(["cat"], tokenizer=tokenizer, show_progress=False).save_merged_pretrained(target)
    (target / "notes.txt").write_text("mine")
    (target / "pytorch_model.bin").write_bytes(b"an earlier checkpoint's weights")  # stale: not written again
    model = tiny_clip().add_forget_adapter(["dog"], tokenizer=tokenizer, show_progress=False)
    model.save_merged_pretrained(target)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert "- dog" in (target / "README.md").read_text()
    CLIPModel.from_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_the_working_directory_is_saved_into_and_stays_the_working_directory(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    write_directory_atomically(target, writer(FIRST))
    monkeypatch.chdir(target)
    write_directory_atomically(".", writer(SECOND))
    assert os.getcwd() == str(target) and contents(target) == SECOND
    assert os.stat(".").st_ino == os.stat(target).st_ino  # the same directory, not a removed one
