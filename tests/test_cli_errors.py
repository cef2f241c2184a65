"""CLI errors the user can fix end in one `error:` line naming the file or repo and the fix — no traceback."""

import os
import re
import shutil

import huggingface_hub.constants
import pytest

from hf_clip_forget.cli import main

from .test_cli import save_tiny_model, write_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model_dir = save_tiny_model(root / "model")
    data = write_images(root / "test.parquet", num_images=8)
    assert main(["forget", model_dir, "--classes", "cat", "--templates", "single", "--output", str(root / "a")]) == 0
    return root, model_dir, data


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = re.findall(r"^error: .*$", err, re.M)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def corrupt(path) -> None:
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")


def test_a_missing_adapter_directory(files, tmp_path, capsys):
    _, model_dir, data = files
    missing = str(tmp_path / "no-such-adapter")
    assert main(["eval", model_dir, "--adapter", missing, "--data", data, "--no-cache"]) == 2
    assert (
        one_error_line(capsys)
        == f"error: adapter {missing!r} does not exist. Give an existing local path or a Hub repo id."
    )


def test_a_merged_model_given_as_adapter_points_to_reference(files, tmp_path, capsys):
    _, model_dir, data = files
    assert main(["eval", model_dir, "--adapter", model_dir, "--data", data, "--no-cache"]) == 2
    line = one_error_line(capsys)
    assert "holds no adapter_config.json" in line and "--reference BASE" in line


def test_a_corrupt_adapter_file_is_named(files, tmp_path, capsys):
    root, model_dir, data = files
    shutil.copytree(root / "a", tmp_path / "a")
    corrupt(tmp_path / "a" / "adapter_model.safetensors")
    assert main(["eval", model_dir, "--adapter", str(tmp_path / "a"), "--data", data, "--no-cache"]) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "a" / "adapter_model.safetensors") in line and "corrupt or truncated" in line


def test_a_corrupt_model_file_is_named(files, tmp_path, capsys):
    _, model_dir, data = files
    shutil.copytree(model_dir, tmp_path / "m")
    corrupt(tmp_path / "m" / "model.safetensors")
    assert main(["eval", str(tmp_path / "m"), "--forget", "cat", "--data", data, "--no-cache"]) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "m" / "model.safetensors") in line and "corrupt or truncated" in line


def test_a_missing_model_directory(files, tmp_path, capsys):
    _, _, data = files
    missing = str(tmp_path / "no-such-model")
    assert main(["forget", missing, "--classes", "cat", "--output", str(tmp_path / "out")]) == 2
    assert (
        one_error_line(capsys)
        == f"error: model {missing!r} does not exist. Give an existing local path or a Hub repo id."
    )


def test_a_repo_the_hub_does_not_have(files, fake_hub, capsys):
    _, _, data = files
    assert main(["eval", "nobody/no-such-model", "--forget", "cat", "--data", data]) == 2
    line = one_error_line(capsys)
    assert "cannot load model 'nobody/no-such-model' from the Hub" in line and "Check the id" in line


def test_offline_mode_says_the_repo_is_not_cached(files, fake_hub, monkeypatch, capsys):
    _, model_dir, data = files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests = len(fake_hub.requests)
    assert main(["eval", "nobody/uncached-model", "--forget", "cat", "--data", data]) == 2
    line = one_error_line(capsys)
    assert "'nobody/uncached-model' is not a local path and is not in the Hub cache" in line
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in line
    assert main(["eval", model_dir, "--adapter", "nobody/uncached-adapter", "--data", data]) == 2
    assert "adapter 'nobody/uncached-adapter' is not a local path" in one_error_line(capsys)
    assert len(fake_hub.requests) == requests  # nothing was asked of the Hub


def test_an_output_folder_that_does_not_exist_is_refused_before_any_work(files, tmp_path, capsys):
    _, model_dir, data = files
    out = str(tmp_path / "missing" / "report.json")
    assert main(["eval", model_dir, "--forget", "cat", "--data", data, "--json", out]) == 2
    assert "does not exist. Create it first." in one_error_line(capsys)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_os_errors_while_writing_name_the_file(files, capsys):
    _, model_dir, data = files
    assert main(["eval", model_dir, "--forget", "cat", "--data", data, "--json", "/dev/full"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: cannot write --json '/dev/full'") and "No space left on device" in line


def test_debug_shows_the_traceback(files, tmp_path):
    _, model_dir, data = files
    missing = str(tmp_path / "no-such-adapter")
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "eval", model_dir, "--adapter", missing, "--data", data])


def test_adapter_and_reference_are_exclusive_and_reference_needs_forget(files, capsys):
    _, model_dir, data = files
    assert main(["eval", model_dir, "--adapter", model_dir, "--reference", model_dir, "--data", data]) == 2
    assert "not both" in one_error_line(capsys)
    assert main(["eval", model_dir, "--data", data]) == 2
    assert "give --forget CLASSES" in one_error_line(capsys)


def test_type_errors_of_the_library_are_one_line_but_other_type_errors_are_bugs():
    import datasets

    from hf_clip_forget.cli import _error_message
    from hf_clip_forget.evaluation import resolve_columns

    with pytest.raises(TypeError) as ours:
        resolve_columns(datasets.DatasetDict())  # a deliberate check of the library
    assert _error_message(ours.value).startswith("Got a DatasetDict")
    with pytest.raises(TypeError) as bug:
        len(5)  # a TypeError not raised by a check of the library: a bug, which keeps its traceback
    assert _error_message(bug.value) is None


# ------------------------------------------------------------------ the command line names flags, not keywords
def no_keyword(line: str) -> str:
    """``line`` after checking it names no API keyword (``forget_classes=``, `` `split=` ``, `` `retain_classes` ``)."""
    assert "`" not in line and not re.search(r"\b\w+=", line), line
    return line


def test_an_adapter_forgetting_a_class_the_data_lacks_points_to_forget(files, tmp_path, capsys):
    _, model_dir, data = files
    adapter = str(tmp_path / "no-truck")
    assert main(["forget", model_dir, "--classes", "truck", "--templates", "single", "--output", adapter]) == 0
    capsys.readouterr()
    assert main(["eval", model_dir, "--adapter", adapter, "--data", data, "--no-cache"]) == 2
    line = no_keyword(one_error_line(capsys))
    assert f"--adapter {adapter!r} (forgetting truck) names classes that --data does not have: 'truck'" in line
    assert "give --forget with the classes of --data" in line


def test_a_forget_class_the_data_lacks_is_named_with_the_closest_class(files, capsys):
    _, model_dir, data = files
    assert main(["eval", model_dir, "--forget", "cta", "--data", data, "--no-cache"]) == 2
    line = no_keyword(one_error_line(capsys))
    assert "--forget 'cta' names classes that --data does not have: 'cta' (did you mean 'cat'?)" in line
    assert main(["sweep", model_dir, "--classes", "dgo", "--data", data, "--no-cache"]) == 2
    assert "--classes 'dgo' names classes that --data does not have: 'dgo' (did you mean 'dog'?)" in no_keyword(
        one_error_line(capsys)
    )


def test_a_split_the_data_lacks_points_to_split(files, tmp_path, capsys):
    root, model_dir, _ = files
    folder = tmp_path / "splits"
    folder.mkdir()
    for split in ("train", "test"):
        write_images(folder / f"{split}.parquet", num_images=4)
    assert main(["eval", model_dir, "--forget", "cat", "--data", str(folder), "--split", "validation"]) == 2
    line = no_keyword(one_error_line(capsys))
    assert "has no split 'validation'; it has ['test', 'train']. Give --split one of them." in line


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["sweep", "{model}", "--classes", ",", "--data", "{data}"], "--classes"),
        (["forget", "{model}", "--classes", "cat", "--retain-classes", ",", "--output", "{out}"], "--retain-classes"),
        (["forget", "{model}", "--classes", "cat", "--domains", " , ", "--output", "{out}"], "--domains"),
        (["eval", "{model}", "--forget", ",", "--data", "{data}"], "--forget"),
    ],
)
def test_an_empty_list_names_its_flag(files, tmp_path, capsys, command, flag):
    _, model_dir, data = files
    argv = [a.format(model=model_dir, data=data, out=tmp_path / "out") for a in command]
    assert main(argv) == 2
    line = no_keyword(one_error_line(capsys))
    assert line.startswith(f"error: {flag} ") and "is empty: give at least one name" in line, line
    assert not (tmp_path / "out").exists()
