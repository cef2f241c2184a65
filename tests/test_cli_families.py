"""The command line on every image family: `forget` edits the family's own image-side module, `eval` reports before and
after, and `--merge` saves a merged model where the edit is mergeable and is refused, with nothing written, where it
is not (SigLIP, SigLIP 2 and ALIGN edit their image side on a module's output)."""

import json

import pytest

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.cli import main
from hf_clip_forget.families import FAMILIES, family_of_class
from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer

from .test_cli import CLASSES, write_images
from .test_cli_errors import one_error_line
from .test_eval_families import processor_for


IMAGE_FAMILIES = [
    name for family in FAMILIES if family.inputs == "image" and not family.detector for name in family.model_classes
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "test.parquet", num_images=16)


def saved_model(class_name: str, path) -> str:
    tiny_model(class_name).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    processor_for(class_name).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("class_name", IMAGE_FAMILIES)
def test_forget_eval_and_merge_on_every_image_family(class_name, data_file, tmp_path, capsys):
    family = family_of_class(class_name)
    model_dir = saved_model(class_name, tmp_path / "model")
    adapter = tmp_path / "adapter"
    assert main(["forget", model_dir, "--classes", "cat", "--templates", "single", "--output", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == [family.image.module] and config["mergeable"] is family.image.mergeable
    reloaded = ForgetPeftModel.from_pretrained(tiny_model(class_name), adapter)
    assert reloaded.forgotten_classes == {"default": ["cat"]}

    report = tmp_path / "report.json"
    assert main(["eval", model_dir, "--adapter", str(adapter), "--data", data_file, "--templates", "single",
                 "--no-cache", "--json", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert set(result["after"]["per_class"]) == set(CLASSES)

    merged = tmp_path / "merged"
    code = main(["forget", model_dir, "--classes", "cat", "--templates", "single", "--merge", "--output", str(merged)])
    if family.image.mergeable:
        assert code == 0 and (merged / "config.json").exists()
    else:
        assert code == 2 and "merg" in one_error_line(capsys) and not merged.exists()
