"""`eval` and `sweep` under `torchrun` on 2 CPU processes: the embedding is shared, the numbers are the 1-process ones."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from hf_clip_forget.cli import load_dual_encoder, main
from hf_clip_forget.evaluation import ImageFeatures, embed_images, load_labelled_images

from .test_cli import save_tiny_model, write_images


# 13 images in batches of 3: 5 batches, shared 3 + 2 between the processes (an uneven split; the last batch is short)
NUM_IMAGES, BATCH_SIZE = 13, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    model_dir = save_tiny_model(root / "model")
    data = write_images(root / "test.parquet", num_images=NUM_IMAGES)
    assert main(["forget", model_dir, "--classes", "cat", "--templates", "single", "--output", str(root / "a")]) == 0
    return root, model_dir, data


def torchrun(args: list[str], home) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m hf_clip_forget.cli ARGS``, offline, with its own HF_HOME."""
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "hf_clip_forget.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    return result


def test_eval_on_two_processes_gives_the_one_process_numbers(setup, tmp_path):
    root, model_dir, data = setup
    args = ["eval", model_dir, "--adapter", str(root / "a"), "--data", data, "--batch-size", str(BATCH_SIZE)]
    assert main([*args, "--no-cache", "--json", str(tmp_path / "one.json")]) == 0
    result = torchrun([*args, "--json", str(tmp_path / "two.json")], tmp_path / "home")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two == json.loads((tmp_path / "one.json").read_text())
    assert two["after"]["num_images"] == NUM_IMAGES
    assert result.stdout.count("forget_accuracy") == 1  # the main process alone reports
    assert f"image features of {NUM_IMAGES} images: embedded by 2 processes" in result.stderr
    # the main process alone cached the gathered features: every image once, in dataset order
    (entry,) = glob.glob(str(tmp_path / "home" / "hf_clip_forget" / "features" / "*.safetensors"))
    model, _, processor = load_dual_encoder(model_dir)
    expected = embed_images(model, load_labelled_images(data), processor, batch_size=BATCH_SIZE, show_progress=False)
    cached = ImageFeatures.load(entry)
    assert torch.equal(cached.labels, expected.labels)
    # two processes embed other batches than one: the vision tower's float32 sums run in another order, the longest
    # its patch embedding's over 3 × 8 × 8 = 192 inputs, each off by up to about 192 × eps relative to the scale
    tolerance = 192 * torch.finfo(torch.float32).eps * float(expected.features.abs().max())
    torch.testing.assert_close(cached.features, expected.features, rtol=0, atol=tolerance)


def test_sweep_on_two_processes_gives_the_one_process_numbers(setup, tmp_path):
    _, model_dir, data = setup
    args = ["sweep", model_dir, "--classes", "cat", "--data", data, "--alphas", "1", "--batch-size", str(BATCH_SIZE)]
    assert main([*args, "--no-cache", "--json", str(tmp_path / "one.json")]) == 0
    result = torchrun([*args, "--no-cache", "--json", str(tmp_path / "two.json")], tmp_path / "home")
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert result.stdout.count("before") == 1


def test_forget_refuses_to_run_on_several_processes(setup, tmp_path, monkeypatch, capsys):
    _, model_dir, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["forget", model_dir, "--classes", "cat", "--output", str(tmp_path / "a")]) == 2
    assert "`forget` runs in one process, but this run was launched as 2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
