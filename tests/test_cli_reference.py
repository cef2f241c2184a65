"""`eval MERGED --reference BASE`: the 'before' column is BASE, the 'after' column the merged checkpoint."""

import json
import os

import huggingface_hub.constants
import pytest

from hf_clip_forget.cli import main
from hf_clip_forget.testing_utils import tiny_clip

from .test_cli import save_tiny_model, write_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    base = save_tiny_model(root / "base")
    data = write_images(root / "test.parquet", num_images=12)
    forget = ["forget", base, "--classes", "cat", "--retain-classes", "dog,bird,ship", "--templates", "single"]
    assert main([*forget, "--output", str(root / "adapter")]) == 0
    assert main([*forget, "--merge", "--output", str(root / "merged")]) == 0
    return root, base, data


def evaluate(out, *args) -> dict:
    assert main(["eval", *args, "--templates", "single", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_reference_gives_the_before_column_of_a_merged_model(files, tmp_path, monkeypatch, capsys):
    root, base, data = files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "home"))
    merged = str(root / "merged")
    report = evaluate(tmp_path / "merged.json", merged, "--reference", base, "--forget", "cat", "--data", data)
    assert report["models"] == {"before": base, "after": merged}
    assert "the vision towers are identical: both columns use the same image features" in capsys.readouterr().err
    # merging keeps the vision tower: one set of cached features serves both models
    assert len(os.listdir(tmp_path / "home" / "hf_clip_forget" / "features")) == 1
    unedited = evaluate(tmp_path / "base.json", base, "--forget", "cat", "--data", data)
    adapter = evaluate(tmp_path / "adapter.json", base, "--adapter", str(root / "adapter"), "--data", data)
    assert report["before"] == unedited["after"]
    assert report["after"] == adapter["after"]


def test_a_reference_with_another_vision_tower_gets_its_own_features(files, tmp_path, capsys):
    root, _, data = files
    other = save_tiny_model(tmp_path / "other", tiny_clip(seed=1))
    merged = str(root / "merged")
    args = ["--forget", "cat", "--data", data, "--no-cache"]
    report = evaluate(tmp_path / "merged.json", merged, "--reference", other, *args)
    assert (
        "the vision towers or image processors differ: each column uses its own model's image features"
        in capsys.readouterr().err
    )
    assert report["before"] == evaluate(tmp_path / "other.json", other, *args)["after"]
    assert report["after"] == evaluate(tmp_path / "alone.json", merged, *args)["after"]
