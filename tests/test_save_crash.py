"""A save is all or nothing whatever moment it is interrupted at (issue items 9 and 10): after a crash the target holds
the complete earlier save or the complete new one, and the next save leaves no staging folder behind.

* every filesystem call of a save is made to fail in turn, once (an exception) or for good (a crash: that call and
  every later one fail, so that no clean-up runs), for both ways of saving (exchanging the directory, and the
  journaled install used where that is impossible) and for a new directory;
* a real process saving real adapters (and merged models) over and over is killed with SIGKILL at random moments;
* staging folders of killed saves are removed (or, for a committed journal, finished) by the next save, and nothing
  else is touched.
"""

import contextlib
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from hf_clip_forget import files
from hf_clip_forget.files import STAGING_PREFIX, _fs, recover_interrupted_save, write_directory_atomically


fcntl = pytest.importorskip("fcntl")  # POSIX: the tests fail every call a save makes, locks included


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def no_flushing(monkeypatch):
    """``fsync`` does nothing in this process: these tests simulate crashes of the process, not of the machine (the
    page cache survives), and flushing hundreds of saves would only make them slow. The order of the flushes is
    checked by a test of its own."""
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


@pytest.fixture
def scratch(tmp_path):
    """A folder for the hundreds of saves of the fault-injection tests: in memory (``/dev/shm``, where removing a
    folder takes microseconds, not milliseconds) where there is one, else ``tmp_path``."""
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield tmp_path
        return
    folder = tempfile.mkdtemp(prefix="save-crash-", dir="/dev/shm")
    yield pathlib.Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def writer(contents: dict[str, bytes]):
    def write(staging: str) -> None:
        for name, data in contents.items():
            path = os.path.join(staging, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)

    return write


FIRST = {
    "README.md": b"card: first",
    "adapter_config.json": b"first config",
    "adapter_model.safetensors": b"first weights",
    "b/adapter_config.json": b"b config",
    "b/adapter_model.safetensors": b"b weights",
}
SECOND = {
    "README.md": b"card: second",
    "adapter_config.json": b"second config",
    "adapter_model.safetensors": b"second weights",
    "c/adapter_config.json": b"c config",
    "c/adapter_model.safetensors": b"c weights",
}


def snapshot(root) -> dict:
    """Every entry under ``root`` (staging folders of a save left out): folders and files with their modes, file
    contents byte for byte, links with what they point to."""
    root = str(root)
    found = {".": ("folder", stat.S_IMODE(os.stat(root).st_mode))}
    for current, folders, names in os.walk(root):
        if current == root:
            folders[:] = [name for name in folders if not name.startswith(STAGING_PREFIX)]
        for name in folders + names:
            path = os.path.join(current, name)
            relative = os.path.relpath(path, root)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if os.path.islink(path):
                found[relative] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[relative] = ("folder", mode)
            else:
                with open(path, "rb") as handle:
                    found[relative] = ("file", handle.read(), mode)
    return found


def staging_folders(*directories) -> list[str]:
    """Staging folders of saves inside each directory and beside it."""
    found = []
    for directory in map(str, directories):
        places = [directory, os.path.dirname(directory)] if os.path.isdir(directory) else [os.path.dirname(directory)]
        for place in places:
            found += [os.path.join(place, name) for name in os.listdir(place) if STAGING_PREFIX in name]
    return sorted(set(found))


def prepare(target) -> None:
    """An earlier save with the user's things around it: files, a folder, an empty folder, a link, a file inside
    an adapter folder of the save, a replaced file with a mode of its own, a directory mode of its own."""
    write_directory_atomically(target, writer(FIRST))
    (target / "notes.txt").write_text("mine")
    (target / "data").mkdir()
    (target / "data" / "table.csv").write_text("1,2")
    (target / "data" / "empty").mkdir()
    (target / "b" / "notes.txt").write_text("about b")
    (target / "latest").symlink_to("adapter_model.safetensors")
    (target / "adapter_config.json").chmod(0o600)
    target.chmod(0o751)


class Crash(BaseException):
    """The process dies at this call: it and every later one fail (no clean-up can run)."""


#: Every call a save makes that changes the filesystem (``shutil.rmtree`` and ``os.makedirs`` go through these).
STEPS = [
    (os, name)
    for name in (
        "mkdir", "rmdir", "rename", "replace", "link", "symlink", "unlink", "remove", "chmod", "chown", "utime",
        "fsync", "open", "write", "setxattr",
    )
    if hasattr(os, name)
] + [(fcntl, "flock"), (_fs, "renameat2")]  # fmt: skip


@contextlib.contextmanager
def faults(at: int | None = None, crash: bool = True):
    """Count the filesystem calls made inside the block; fail call number ``at`` (with ``crash``, every later one
    too). Yields the list of calls made (their names). ``fsync`` is counted but does nothing (a simulated crash
    loses nothing that was written; flushing would only make the test slow)."""
    calls = []
    originals = [(module, name, getattr(module, name)) for module, name in STEPS]

    def counted(name, function):
        def step(*args, **kwargs):
            calls.append(name)
            index = len(calls) - 1
            if at is not None and (index >= at if crash else index == at):
                if crash:
                    raise Crash(f"killed at call {index} ({name})")
                raise OSError(errno.EIO, f"injected failure at call {index} ({name})")
            return function(*args, **kwargs)

        return step

    for module, name, function in originals:
        setattr(module, name, counted(name, (lambda descriptor: None) if name == "fsync" else function))
    try:
        yield calls
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


@contextlib.contextmanager
def exchange_refused(error: int):
    """``renameat2(RENAME_EXCHANGE)`` fails with ``error`` (as on a filesystem that cannot exchange)."""
    original = _fs.renameat2

    def refusing(source, destination, flags):
        if flags == _fs.RENAME_EXCHANGE:
            raise OSError(error, os.strerror(error), source)
        return original(source, destination, flags)

    _fs.renameat2 = refusing
    try:
        yield
    finally:
        _fs.renameat2 = original


@contextlib.contextmanager
def journaled():
    """Saves install file by file, journaled (as into a mount point)."""
    original = files._exchange_possible
    files._exchange_possible = lambda directory: False
    try:
        yield
    finally:
        files._exchange_possible = original


MODES = {
    "exchange": contextlib.nullcontext,
    "journaled": journaled,
    "exchange refused": lambda: exchange_refused(errno.EXDEV),  # then journaled, from the files staged beside
}


def expected_states(tmp_path, mode):
    """(the directory before, after a successful save, the number of filesystem calls that save makes)."""
    target = tmp_path / "reference" / "adapter"
    target.parent.mkdir()
    prepare(target)
    before = snapshot(target)
    with MODES[mode](), faults() as calls:
        write_directory_atomically(target, writer(SECOND))
    after = snapshot(target)
    assert after != before and not staging_folders(target)
    return before, after, len(calls)


# ------------------------------------------------------------------------------------ every call fails in turn
@pytest.mark.parametrize("crash", [True, False], ids=["crash", "error"])
@pytest.mark.parametrize("mode", MODES)
def test_a_save_failing_at_any_call_leaves_the_old_or_the_new_directory(scratch, mode, crash):
    before, after, steps = expected_states(scratch, mode)
    assert steps > 20
    outcomes = set()
    for step in range(steps):
        target = scratch / f"run{step}" / "adapter"
        target.parent.mkdir()
        prepare(target)
        failed = False
        try:
            with MODES[mode](), faults(at=step, crash=crash):
                write_directory_atomically(target, writer(SECOND))
        except (Crash, OSError):
            failed = True
        state = snapshot(target)
        if mode == "exchange" or not crash:  # no recovery needed
            assert state in (before, after), f"call {step}: a mix of the old and the new save"
        if not failed:
            assert state == after, f"call {step}: the save did not fail, but the new files are not all in place"
        recover_interrupted_save(target)
        state = snapshot(target)
        assert state in (before, after), f"call {step}: a mix of the old and the new save after recovery"
        assert not staging_folders(target), f"call {step}: recovery left {staging_folders(target)}"
        outcomes.add("old" if state == before else "new")
        write_directory_atomically(target, writer(SECOND))  # the next save
        assert snapshot(target) == after and not staging_folders(target), f"call {step}"
    assert outcomes == {"old", "new"}  # the failures hit both sides of the point of no return


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "error"])
def test_a_save_into_a_new_directory_failing_at_any_call_leaves_nothing_or_the_new_directory(scratch, crash):
    reference = scratch / "reference" / "adapter"
    with faults() as calls:
        write_directory_atomically(reference, writer(FIRST))
    after, steps = snapshot(reference), len(calls)
    for step in range(steps):
        target = scratch / f"run{step}" / "adapter"
        target.parent.mkdir()
        with contextlib.suppress(Crash, OSError), faults(at=step, crash=crash):
            write_directory_atomically(target, writer(FIRST))
        assert not target.exists() or snapshot(target) == after, f"call {step}"
        write_directory_atomically(target, writer(FIRST))
        assert snapshot(target) == after and not staging_folders(target), f"call {step}"


def test_the_exchange_is_one_atomic_call_and_comes_after_everything_is_flushed(tmp_path):
    target = tmp_path / "adapter"
    prepare(target)
    with faults() as calls:
        write_directory_atomically(target, writer(SECOND))
    exchange = calls.index("renameat2")
    assert calls.count("renameat2") == 1
    assert "fsync" in calls[:exchange] and "fsync" in calls[exchange:]  # the new tree before, the parent after
    assert not {"rename", "replace"} & set(calls)  # nothing is moved file by file


# ------------------------------------------------------------------------------------ leftovers of killed saves
def crash_at(target, call_name: str, occurrence: int = 0, mode: str = "exchange") -> None:
    """Run a save of SECOND into ``target`` (prepared) that is killed at its ``occurrence``-th call to ``call_name``
    (counted on a save into a copy)."""
    probe = target.parent / f"{target.name}-probe"
    prepare(probe)
    with MODES[mode](), faults() as calls:
        write_directory_atomically(probe, writer(SECOND))
    indices = [index for index, name in enumerate(calls) if name == call_name]
    with pytest.raises(Crash), MODES[mode](), faults(at=indices[occurrence]):
        write_directory_atomically(target, writer(SECOND))


def test_the_next_save_removes_what_a_save_killed_before_its_exchange_left(tmp_path):
    target = tmp_path / "adapter"
    prepare(target)
    before = snapshot(target)
    crash_at(target, "renameat2")
    (leftover,) = staging_folders(target)
    assert os.path.dirname(leftover) == str(tmp_path)
    assert os.path.basename(leftover).startswith(".adapter.hf_clip_forget-saving-")
    assert snapshot(target) == before
    write_directory_atomically(target, writer(FIRST))
    assert not staging_folders(target)


def test_the_next_save_removes_the_old_directory_a_save_killed_after_its_exchange_left(tmp_path):
    target = tmp_path / "adapter"
    prepare(target)
    crash_at(target, "fsync", occurrence=-1)  # the parent, flushed after the exchange
    (leftover,) = staging_folders(target)
    assert snapshot(os.path.join(leftover, "tree"))["notes.txt"][1] == b"mine"  # the old directory
    assert (target / "README.md").read_bytes() == b"card: second"
    assert recover_interrupted_save(target) == [leftover]
    assert not staging_folders(target)


def test_a_committed_journal_is_finished_and_an_uncommitted_one_discarded(tmp_path):
    committed, uncommitted = tmp_path / "committed" / "adapter", tmp_path / "uncommitted" / "adapter"
    for target in (committed, uncommitted):
        target.parent.mkdir()
        prepare(target)
    before = snapshot(uncommitted)
    crash_at(committed, "replace", occurrence=1, mode="journaled")  # one file moved in
    crash_at(uncommitted, "rename", mode="journaled")  # the plan, never renamed into place: not committed
    assert (committed / "README.md").read_bytes() == b"card: second"
    assert (committed / "adapter_config.json").read_bytes() == b"first config"  # a mix, until recovered
    (journal,) = staging_folders(committed)
    assert os.path.dirname(journal) == str(committed)

    assert recover_interrupted_save(committed) == [journal]
    assert recover_interrupted_save(uncommitted) != []
    reference = tmp_path / "reference"
    reference.mkdir()
    prepare(reference)
    write_directory_atomically(reference, writer(SECOND))
    assert snapshot(committed) == snapshot(reference)
    assert snapshot(uncommitted) == before
    assert not staging_folders(committed) and not staging_folders(uncommitted)


def test_an_interrupted_roll_back_is_finished(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    prepare(target)
    before = snapshot(target)
    monkeypatch.setattr(files, "_exchange_possible", lambda directory: False)
    original_replace, seen = os.replace, []

    def failing(*args, **kwargs):
        seen.append(args)
        if len(seen) == 2:
            raise OSError(errno.EIO, "I/O error")  # the second file: the install is undone
        if len(seen) == 4:
            raise Crash("killed while undoing")
        return original_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises((Crash, OSError)):
        write_directory_atomically(target, writer(SECOND))
    monkeypatch.setattr(os, "replace", original_replace)
    (journal,) = staging_folders(target)
    assert "undo" in os.listdir(journal)
    recover_interrupted_save(target)
    assert snapshot(target) == before and not staging_folders(target)


def test_leftovers_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "adapter"
    prepare(target)
    # a killed save of an earlier version (staging inside the target, never committed)
    old_style = target / ".hf_clip_forget-saving-k2j4_x1q"
    (old_style / "new").mkdir(parents=True)
    (old_style / "new" / "adapter_config.json").write_text("half")
    (old_style / "old").mkdir()
    # a killed exchange-save (beside the target)
    beside = tmp_path / ".adapter.hf_clip_forget-saving-0123456789ab"
    (beside / "tree").mkdir(parents=True)
    (beside / "tree" / "README.md").write_text("half")
    # what is not ours, or not this directory's, or still in use
    other = tmp_path / ".other.hf_clip_forget-saving-0123456789ab"
    (other / "tree").mkdir(parents=True)
    not_a_staging = tmp_path / ".adapter.hf_clip_forget-saving-backup"
    not_a_staging.mkdir()
    foreign = tmp_path / ".adapter.hf_clip_forget-saving-aaaaaaaaaaaa"
    (foreign / "photos").mkdir(parents=True)
    tampered = target / ".hf_clip_forget-saving-tampered"
    tampered.mkdir()
    (tampered / "tree").mkdir()
    (tampered / "plan.json").write_text(json.dumps({"folders": [], "files": ["../../x"], "stale": []}))
    running = tmp_path / ".adapter.hf_clip_forget-saving-bbbbbbbbbbbb"
    (running / "tree").mkdir(parents=True)
    lock = _fs.lock_folder(str(running))  # a save still running holds its lock
    try:
        write_directory_atomically(target, writer(SECOND))
    finally:
        _fs.unlock(lock)
    assert not old_style.exists() and not beside.exists()
    for kept in (other, not_a_staging, foreign, tampered, running):
        assert kept.exists(), kept
    assert (target / "README.md").read_bytes() == b"card: second"
    assert sorted(os.listdir(tampered)) == ["plan.json", "tree"]  # left as found (carried into the new directory)
    write_directory_atomically(target, writer(SECOND))
    assert not running.exists()  # its save is over: the next save removes it


def test_what_a_killed_save_of_the_earlier_version_had_replaced_is_put_back(tmp_path):
    """That version moved files in one by one, backing each up in ``old/`` just before; killed midway, it left a
    new card beside the old config and factors."""
    target = tmp_path / "adapter"
    prepare(target)
    before = snapshot(target)
    leftover = target / ".hf_clip_forget-saving-x81_qa3z"
    (leftover / "new").mkdir(parents=True)
    (leftover / "new" / "adapter_config.json").write_bytes(b"second config")
    (leftover / "old").mkdir()
    os.link(target / "README.md", leftover / "old" / "README.md")
    (target / "README.md").unlink()
    (target / "README.md").write_bytes(b"card: second")
    assert recover_interrupted_save(target) == [str(leftover)]
    assert snapshot(target) == before


def test_recovery_on_a_clean_directory_changes_nothing(tmp_path):
    target = tmp_path / "adapter"
    prepare(target)
    before, listing = snapshot(target), sorted(os.listdir(tmp_path))
    with faults() as calls:
        assert recover_interrupted_save(target) == []
        assert recover_interrupted_save(tmp_path / "missing") == []
    assert calls == [] and snapshot(target) == before and sorted(os.listdir(tmp_path)) == listing


# ------------------------------------------------------------------------------------------------ kill -9
ZYGOTE = r"""
import os, sys
import torch
torch.set_num_threads(1)
import threading

import tqdm
import transformers

import hf_clip_forget
from hf_clip_forget import files

# a saver killed while it holds tqdm's lock would hold it forever: tqdm's default lock is a multiprocessing lock,
# shared with every forked child; give this process a lock of its own and no progress bars
tqdm.tqdm.set_lock(threading.RLock())
transformers.utils.logging.disable_progress_bar()
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

adapters, merged, references = sys.argv[1:4]
tokenizer = tiny_tokenizer()
models = {
    name: tiny_clip().add_forget_adapter([name], tokenizer=tokenizer, show_progress=False) for name in ("dog", "cat")
}
for name, model in models.items():
    model.save_pretrained(os.path.join(references, name))
    model.save_merged_pretrained(os.path.join(references, "merged-" + name))

def save(index):
    model = models[("dog", "cat")[index % 2]]
    model.save_pretrained(adapters)
    model.save_merged_pretrained(merged)

def answer(*words):
    print("@@", *words, flush=True)

save(0)
answer("ready")
for line in sys.stdin:
    command, *arguments = line.split()
    if command == "fork":
        start, journaled = map(int, arguments)
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                if journaled:
                    files._exchange_possible = lambda directory: False
                index = start
                while True:
                    save(index)
                    index += 1
            finally:
                os._exit(1)
        answer(pid)
    elif command == "reap":
        _, status = os.waitpid(int(arguments[0]), 0)
        answer(status)
    elif command == "save":
        save(int(arguments[0]))
        answer("saved")
"""


class Zygote:
    """A Python process that has imported the package and built two adapters once, and forks savers on demand
    (importing torch for every killed process would take seconds)."""

    def __init__(self, tmp_path, *arguments):
        self.log = open(tmp_path / "zygote.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, *map(str, arguments)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip

    def read(self) -> str:
        for line in self.process.stdout:
            if line.startswith("@@ "):
                return line[3:].strip()
        self.log.seek(0)
        raise RuntimeError(f"the saving process died:\n{self.log.read()[-3000:]}")

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.log.close()


def check_adapters(directory, references, user_files) -> str:
    """The adapter directory is byte for byte one of the two reference saves (plus the user's file), loads, and its
    factors, config and card all name the same class. Returns that class."""
    from hf_clip_forget import ForgetPeftModel
    from hf_clip_forget.testing_utils import tiny_clip

    state = snapshot(directory)
    matches = [name for name in ("dog", "cat") if state == {**snapshot(references / name), **user_files}]
    assert len(matches) == 1, f"neither the old nor the new save: {sorted(state)}"
    (name,) = matches
    model = ForgetPeftModel.from_pretrained(tiny_clip(), directory)  # checks the factors against the checksums
    assert model.forgotten_classes == {"default": [name]}
    assert json.loads((directory / "adapter_config.json").read_text())["forgotten_classes"] == [name]
    assert f"forgotten_classes:\n- {name}\n" in (directory / "README.md").read_text()
    return name


def check_merged(directory, references) -> str:
    state = snapshot(directory)
    matches = [name for name in ("dog", "cat") if state == snapshot(references / f"merged-{name}")]
    assert len(matches) == 1, f"neither the old nor the new merged save: {sorted(state)}"
    return matches[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saving processes are forked")
def test_a_saving_process_killed_at_random_moments_leaves_a_loadable_save(tmp_path):
    adapters, merged, references = tmp_path / "adapters", tmp_path / "merged", tmp_path / "references"
    zygote = Zygote(tmp_path, adapters, merged, references)
    rng = random.Random(20240611)
    interrupted = 0
    try:
        assert zygote.read() == "ready"
        (adapters / "notes.txt").write_text("mine")
        user_files = {"notes.txt": ("file", b"mine", stat.S_IMODE(os.stat(adapters / "notes.txt").st_mode))}
        deadline = time.monotonic() + 45
        for run in range(24):
            journaled = run % 3 == 2  # every third saver installs file by file, journaled
            pid = int(zygote.ask(f"fork {run} {int(journaled)}"))
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(pid, signal.SIGKILL)
            assert os.WTERMSIG(int(zygote.ask(f"reap {pid}"))) == signal.SIGKILL
            interrupted += bool(staging_folders(adapters, merged))
            if journaled:  # the journal may have left a mix: a loader recovers first
                recover_interrupted_save(adapters)
                recover_interrupted_save(merged)
            check_adapters(adapters, references, user_files)
            check_merged(merged, references)

            assert zygote.ask(f"save {run}") == "saved"
            assert not staging_folders(adapters, merged)
            assert check_adapters(adapters, references, user_files) == ("dog", "cat")[run % 2]
            assert check_merged(merged, references) == ("dog", "cat")[run % 2]
            if time.monotonic() > deadline:
                break
    finally:
        zygote.close()
    assert interrupted >= 3  # most kills land in the middle of a save

    from transformers import CLIPModel

    CLIPModel.from_pretrained(merged)


def test_a_load_finishes_a_journaled_save_killed_midway(tmp_path):
    # a save into a mount point installs file by file: killed after the first file, the directory is a mix until
    # the journal is finished — which every loader does first, so a load sees the new adapter, complete
    from peft import PeftModel

    from hf_clip_forget import ForgetPeftModel, add_forget_adapter
    from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dog = add_forget_adapter(tiny_clip(), ["dog"], tokenizer, show_progress=False)
    cat = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False)
    probe, target = tmp_path / "probe", tmp_path / "adapter"
    for directory in (probe, target):
        dog.save_pretrained(directory)
    with journaled(), faults() as calls:
        cat.save_pretrained(probe)
    replaces = [index for index, name in enumerate(calls) if name == "replace"]
    with pytest.raises(Crash), journaled(), faults(at=replaces[1]):
        cat.save_pretrained(target)
    assert staging_folders(target)
    assert json.loads((target / "adapter_config.json").read_text())["forgotten_classes"] != ["cat"] or (
        "cat" not in (target / "README.md").read_text()
    )  # a mix of the two saves, until recovered
    loaded = PeftModel.from_pretrained(tiny_clip(), target)
    assert loaded.peft_config["default"].forgotten_classes == ["cat"]
    assert not staging_folders(target)
    assert ForgetPeftModel.from_pretrained(tiny_clip(), target).forgotten_classes == {"default": ["cat"]}
