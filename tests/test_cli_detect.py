"""The command line on open-vocabulary detectors saved to disk: `forget` edits the detector's class head (not the
bare OWL model `AutoModel` would load), `detect` counts boxes per query before/after, and what the image-
classification harness cannot do is refused in one line."""

import json
import pathlib
import re

import pytest
import torch

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.cli import main
from hf_clip_forget.evaluation import DETECTOR_CLASSES, evaluate_detection

from .real_data import needs_pacs
from .test_cli import save_tiny_model, write_images
from .test_cli_errors import one_error_line
from .test_detection_eval import (
    DETECTORS,
    FORGOTTEN,
    MARGIN,
    OTHER,
    QUERIES,
    pacs_photos,
    raw_detection,
    tiny_detector,
    tiny_detector_processor,
)


pytestmark = needs_pacs


def save_tiny_detector(path, class_name: str) -> str:
    """A tiny detector checkpoint directory (model, tokenizer and processor) that the CLI loads as MODEL."""
    tiny_detector(class_name).save_pretrained(path)
    tiny_detector_processor(class_name).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index, image in enumerate(pacs_photos()):
        image.save(folder / f"photo_{index}.png")  # lossless: the files hold exactly these pixels
        paths.append(str(folder / f"photo_{index}.png"))
    return paths


@pytest.fixture(scope="module", params=DETECTORS)
def detector(request, tmp_path_factory):
    """``(class name, model dir, adapter dir)``: a saved tiny detector and the adapter `forget` wrote for it."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny_detector(root / "model", request.param)
    adapter = str(root / "adapter")
    assert main(["forget", model_dir, "--classes", "truck", "--templates", "single", "--output", adapter]) == 0
    return request.param, model_dir, adapter


def detect(*args) -> int:
    return main(["detect", *args, "--queries", ",".join(QUERIES)])


def test_forget_edits_the_detector_class_head_so_the_query_scores_as_an_empty_one(detector, photo_files):
    class_name, _, adapter = detector
    config = json.loads((pathlib.Path(adapter) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["class_head.dense0"] and config["templates"] == ["a photo of a {}."]
    reloaded = ForgetPeftModel.from_pretrained(tiny_detector(class_name), adapter)
    processor = tiny_detector_processor(class_name)
    logits, empty = raw_detection(reloaded, processor, pacs_photos())
    torch.testing.assert_close(logits[..., 0], empty, atol=1e-5, rtol=0)
    assert (logits[..., 1] - empty).abs().max() > 1e-2


def test_detect_prints_and_writes_the_counts_and_drops_the_forgotten_query_above_the_floor(
    detector, photo_files, tmp_path, capsys
):
    class_name, model_dir, adapter = detector
    assert (
        detect(
            model_dir,
            "--adapter",
            adapter,
            "--images",
            *photo_files,
            "--threshold",
            "0",
            "--json",
            str(tmp_path / "a.json"),
        )
        == 0
    )
    floor = json.loads((tmp_path / "a.json").read_text())["empty_query_score"]
    threshold = floor + MARGIN
    out = tmp_path / "b.json"
    capsys.readouterr()
    assert (
        detect(
            model_dir,
            "--adapter",
            adapter,
            "--images",
            *photo_files,
            "--threshold",
            str(threshold),
            "--json",
            str(out),
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["per_query"][FORGOTTEN]["boxes_before"] > 0 and result["per_query"][FORGOTTEN]["boxes_after"] == 0
    assert result["per_query"][FORGOTTEN]["scores_as_empty_query_after"] is True
    assert result["per_query"][OTHER]["scores_as_empty_query_after"] is False
    assert [row["image"] for row in result["per_image"]] == photo_files
    assert result["models"]["after"] == f"{model_dir} + adapter {adapter}"
    # the printed table and the JSON are the counts of the library's evaluation of the same adapter
    reloaded = ForgetPeftModel.from_pretrained(tiny_detector(class_name), adapter)
    expected = evaluate_detection(
        reloaded, tiny_detector_processor(class_name), pacs_photos(), QUERIES, threshold=threshold
    )
    assert [list(row["boxes_after"].values()) for row in result["per_image"]] == [
        list(r) for r in expected.boxes_after
    ]
    assert [list(row["boxes_before"].values()) for row in result["per_image"]] == [
        list(r) for r in expected.boxes_before
    ]
    line = next(line for line in printed.splitlines() if line.startswith(FORGOTTEN))
    assert re.search(rf"\s{expected.total_boxes(FORGOTTEN, 'before')}\s+0\s", line) and "empty query" in line


def test_detect_on_a_merged_detector_takes_the_original_as_reference(detector, photo_files, tmp_path):
    class_name, model_dir, adapter = detector
    merged = str(tmp_path / "merged")
    assert (
        main(["forget", model_dir, "--classes", "truck", "--templates", "single", "--merge", "--output", merged]) == 0
    )
    args = ["--images", *photo_files, "--threshold", "0.5", "--json"]
    assert detect(merged, "--reference", model_dir, *args, str(tmp_path / "m.json")) == 0
    assert detect(model_dir, "--adapter", adapter, *args, str(tmp_path / "a.json")) == 0
    from_merged, from_adapter = (json.loads((tmp_path / name).read_text()) for name in ("m.json", "a.json"))
    assert from_merged["per_image"] == from_adapter["per_image"]
    assert from_merged["models"] == {"before": model_dir, "after": merged}


def test_detect_refuses_a_model_that_is_not_a_detector(tmp_path, photo_files, capsys):
    clip = save_tiny_model(tmp_path / "clip")
    assert detect(clip, "--reference", clip, "--images", *photo_files) == 2
    line = one_error_line(capsys)
    assert "CLIPModel is not an open-vocabulary detector" in line and all(name in line for name in DETECTOR_CLASSES)


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_eval_and_sweep_on_a_detector_point_to_detect(detector, tmp_path, capsys, command):
    _, model_dir, _ = detector
    data = write_images(tmp_path / "test.parquet", num_images=4)
    option = ["--forget", "truck"] if command == "eval" else ["--classes", "truck"]
    assert main([command, model_dir, *option, "--data", data, "--no-cache"]) == 2
    line = one_error_line(capsys)
    assert "zero-shot image classification" in line and "hf-clip-forget detect" in line


def test_forget_on_a_detector_refuses_prototypes_before_any_work(detector, tmp_path, capsys):
    _, model_dir, _ = detector
    output = tmp_path / "never"
    assert main(["forget", model_dir, "--classes", "truck", "--prototypes", "2", "--output", str(output)]) == 2
    assert "--prototypes" in one_error_line(capsys) and not output.exists()


def test_detect_refuses_missing_columns_and_paths(detector, photo_files, tmp_path, capsys):
    _, model_dir, adapter = detector
    assert detect(model_dir, "--images", *photo_files) == 2
    assert "--adapter DIR" in one_error_line(capsys)
    assert detect(model_dir, "--adapter", adapter, "--images", str(tmp_path / "none.png")) == 2
    assert "does not exist" in one_error_line(capsys)
    assert detect(model_dir, "--adapter", adapter, "--images", *photo_files, "--threshold", "1.5") == 2
    assert "[0, 1)" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert detect(model_dir, "--adapter", adapter, "--images", str(tmp_path / "empty")) == 2
    assert "no image files" in one_error_line(capsys)
