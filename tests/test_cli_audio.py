"""The command line on an audio–text model (CLAP) saved to disk: `forget` needs no image processor, embeds class
names with sound templates by default and writes an adapter (or a merged model with its feature extractor) that
removes the sound from every audio embedding; what needs images is refused in one line, before any work."""

import json

import pytest
import torch
from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.cli import main
from hf_clip_forget.core import SOUND_TEMPLATES
from hf_clip_forget.evaluation import DETECTOR_CLASSES
from hf_clip_forget.testing_utils import tiny_audio_inputs, tiny_model, tiny_tokenizer

from .conftest import class_embeddings, features, max_abs_cos
from .test_cli import write_images
from .test_cli_errors import one_error_line


CLASS = "ClapModel"


def save_tiny_clap(path) -> str:
    """A tiny CLAP checkpoint directory: model and processor (tokenizer + feature extractor), no image processor."""
    tiny_model(CLASS).save_pretrained(path)
    ClapProcessor(ClapFeatureExtractor(feature_size=16), tiny_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))


def audio_embeddings(model) -> torch.Tensor:
    with torch.no_grad():
        return features(model.get_audio_features(**tiny_audio_inputs()))


def dog_directions() -> torch.Tensor:
    return class_embeddings(tiny_model(CLASS), tiny_tokenizer(), ["dog"], templates=SOUND_TEMPLATES)


def test_forget_writes_an_adapter_that_removes_the_sound_with_sound_templates_by_default(clap_dir, tmp_path):
    assert main(["forget", clap_dir, "--classes", "dog", "--output", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["templates"] == list(SOUND_TEMPLATES)
    assert config["target_modules"] == ["audio_projection.linear2"]
    directions = dog_directions()
    assert max_abs_cos(audio_embeddings(tiny_model(CLASS)), directions) > 1e-3
    reloaded = ForgetPeftModel.from_pretrained(tiny_model(CLASS), tmp_path / "a")
    assert max_abs_cos(audio_embeddings(reloaded), directions) <= 1e-5
    assert main(["verify", clap_dir, str(tmp_path / "a")]) == 0  # recomputed without an image processor


def test_forget_merge_saves_a_clap_model_with_its_processor(clap_dir, tmp_path):
    merged = tmp_path / "m"
    assert main(["forget", clap_dir, "--classes", "dog", "--merge", "--output", str(merged)]) == 0
    model = ClapModel.from_pretrained(merged).eval()
    assert max_abs_cos(audio_embeddings(model), dog_directions()) <= 1e-5
    processor = ClapProcessor.from_pretrained(merged)  # the merged folder works as saved
    assert processor.feature_extractor.feature_size == 16 and processor.tokenizer("dog")["input_ids"]


def test_prototypes_on_an_audio_model_are_refused_before_any_work(clap_dir, tmp_path, capsys):
    output = tmp_path / "never"
    assert main(["forget", clap_dir, "--classes", "dog", "--prototypes", "2", "--output", str(output)]) == 2
    line = one_error_line(capsys)
    assert "--prototypes synthesises whole pixel images" in line and "ClapModel does not take" in line
    assert not output.exists()


def test_a_merged_push_of_an_audio_model_is_refused_before_any_work(clap_dir, tmp_path, capsys):
    output = tmp_path / "never"
    args = ["forget", clap_dir, "--classes", "dog", "--merge", "--push-to-hub", "me/x", "--output", str(output)]
    assert main(args) == 2
    assert "drop --merge" in one_error_line(capsys) and not output.exists()


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_eval_and_sweep_say_they_are_for_image_classification(clap_dir, tmp_path, capsys, command):
    data = write_images(tmp_path / "test.parquet", num_images=4)
    option = ["--forget", "dog"] if command == "eval" else ["--classes", "dog"]
    assert main([command, clap_dir, *option, "--data", data, "--no-cache"]) == 2
    line = one_error_line(capsys)
    assert "zero-shot image classification" in line and "ClapModel embeds audio" in line


def test_detect_refuses_an_audio_model_listing_the_detectors(clap_dir, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["detect", clap_dir, "--reference", clap_dir, "--images", str(image), "--queries", "a dog"]) == 2
    line = one_error_line(capsys)
    assert "ClapModel is not an open-vocabulary detector" in line and all(n in line for n in DETECTOR_CLASSES)
