"""The `hf-clip-forget` command line on a tiny model saved to disk (mechanics; real images are in docs/)."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.cli import main
from hf_clip_forget.testing_utils import tiny_clip, tiny_tokenizer


CLASSES = ["cat", "dog", "bird", "ship"]


def save_tiny_model(path, model=None, crop: int = 32) -> str:
    """A tiny CLIP checkpoint directory (model, tokenizer, image processor) that the CLI loads as MODEL."""
    (model if model is not None else tiny_clip()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}).save_pretrained(
        path
    )
    return str(path)


def write_images(path, num_images: int = 24, seed: int = 0) -> str:
    """A parquet file of random 32×32 images labelled with CLASSES in turn."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(num_images)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    labels = [i % len(CLASSES) for i in range(num_images)]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "test.parquet")


def test_forget_saves_an_adapter_that_records_the_classes(model_dir, tmp_path):
    assert (
        main(["forget", model_dir, "--classes", "cat, dog", "--templates", "single", "--output", str(tmp_path / "a")])
        == 0
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["forgotten_classes"] == ["cat", "dog"] and config["templates"] == ["a photo of a {}."]
    assert ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "a").forgotten_classes == {
        "default": ["cat", "dog"]
    }


@pytest.mark.parametrize(("extra", "kept"), [([], True), (["--no-keep-shared-direction"], False)])
def test_forget_with_retain_classes_keeps_the_shared_direction_unless_told_not_to(model_dir, tmp_path, extra, kept):
    args = ["forget", model_dir, "--classes", "cat", "--retain-classes", "dog,bird", "--templates", "single"]
    assert main([*args, *extra, "--output", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["retain_classes"] == ["dog", "bird"] and config["keep_shared_direction"] is kept
    assert ("shared direction kept" in (tmp_path / "a" / "README.md").read_text()) is kept


def test_forget_takes_the_ccup_strength_and_refuses_one_the_method_ignores(model_dir, tmp_path, capsys):
    args = ["forget", model_dir, "--classes", "cat", "--retain-classes", "dog,bird", "--templates", "single"]
    assert main([*args, "--method", "ccup", "--ccup-mu", "7", "--ccup-lambda", "300", "--output", str(tmp_path / "a")]) == 0  # fmt: skip
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["ccup_mu"], config["ccup_lambda"]) == (7.0, 300.0)
    assert "300 / 7" in (tmp_path / "a" / "README.md").read_text()  # the card's λ / μ column
    assert main([*args, "--ccup-mu", "7", "--output", str(tmp_path / "b")]) == 2  # a global edit: nullspace
    assert "`ccup_mu` is a strength of ccup edits" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_forget_merge_saves_a_loadable_full_model(model_dir, tmp_path):
    from transformers import CLIPModel

    assert main(["forget", model_dir, "--classes", "cat", "--merge", "--output", str(tmp_path / "m")]) == 0
    merged = CLIPModel.from_pretrained(tmp_path / "m")
    assert not hasattr(merged, "peft_config") and (tmp_path / "m" / "tokenizer.json").exists()
    assert "cat" in (tmp_path / "m" / "README.md").read_text()


def test_eval_writes_before_and_after(model_dir, data_file, tmp_path):
    main(["forget", model_dir, "--classes", "cat", "--output", str(tmp_path / "a")])
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                model_dir,
                "--adapter",
                str(tmp_path / "a"),
                "--data",
                data_file,
                "--json",
                str(out),
                "--no-cache",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report) == {"before", "after", "models"}
    assert report["models"]["after"] == f"{model_dir} + adapter {tmp_path / 'a'}"
    for side in (report["before"], report["after"]):
        assert {"forget_accuracy", "retain_accuracy", "per_class"} <= set(side) and set(side["per_class"]) == set(
            CLASSES
        )


def test_sweep_draws_the_trade_off_plot(model_dir, data_file, tmp_path):
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    args = ["sweep", model_dir, "--classes", "cat", "--data", data_file, "--alphas", "0,0.5,1"]
    assert main([*args, "--plot", str(plot), "--json", str(out), "--no-cache"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert [row["alpha"] for row in result["sweep"]] == [0.0, 0.5, 1.0]
    assert result["sweep"][0]["forget_accuracy"] == result["before"]["forget_accuracy"]  # alpha 0 changes nothing
    assert result["retain_classes"] == ["dog", "bird", "ship"]  # the data's other class names define the shared part
    assert main([*args, "--json", str(out), "--no-cache", "--no-keep-shared-direction"]) == 0
    assert json.loads(out.read_text())["retain_classes"] is None


def test_image_features_are_cached_once_however_the_data_path_is_spelled(model_dir, data_file, tmp_path, monkeypatch):
    import os

    import huggingface_hub.constants

    from hf_clip_forget.cli import cached_image_features, load_dual_encoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "home"))
    model, _, processor = load_dual_encoder(model_dir)
    folder, name = os.path.split(data_file)
    first = cached_image_features(model, processor, data_file, "test", model_dir)
    spelled = os.path.join(folder, "..", os.path.basename(folder), name)
    second = cached_image_features(model, processor, spelled, "test", model_dir)
    assert len(os.listdir(tmp_path / "home" / "hf_clip_forget" / "features")) == 1
    assert torch.equal(first.features, second.features)


def test_bad_input_gets_a_clear_error(model_dir, data_file, tmp_path, capsys):
    assert main(["eval", model_dir, "--data", data_file, "--forget", "unicorn", "--no-cache"]) == 2
    assert "unicorn" in capsys.readouterr().err
    assert main(["forget", model_dir, "--classes", "cat", "--alpha", "3", "--output", str(tmp_path / "x")]) == 2
    assert "alpha" in capsys.readouterr().err and not (tmp_path / "x").exists()
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    ).save_pretrained(tmp_path / "bert")
    assert main(["forget", str(tmp_path / "bert"), "--classes", "cat", "--output", str(tmp_path / "y")]) == 2
    assert "which forget adapters do not support" in capsys.readouterr().err
