"""Forgetting every class is refused: in the build, when the forget directions span the whole embedding space (the
edit would map every embedding to ~0), and in the CLI, when the classes to forget are every class of --data (no
retain accuracy can be measured)."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.core import build_edit_factors
from hf_clip_forget.testing_utils import TINY_CLASS_NAMES, random_pixels, tiny_clip
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .test_cli import CLASSES, save_tiny_model, write_images


TEMPLATES = ["a photo of a {}."]
REFUSAL = r"span the whole (\d+)-dimensional embedding space .* recognises nothing\. Name fewer classes"


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# -------------------------------------------------------------------------------------------------- the build
@pytest.mark.parametrize(("dim", "options"), [(4, {}), (4, {"method": "ccup"}), (16, {})])
def test_forget_directions_spanning_the_embedding_space_are_refused_before_the_model_changes(tokenizer, dim, options):
    model = tiny_clip(projection_dim=dim)
    before = state(model)
    classes = list(TINY_CLASS_NAMES[:dim])  # as many independent classes as dimensions, nothing kept
    with pytest.raises(ValueError, match=REFUSAL) as error:
        add_forget_adapter(model, classes, tokenizer, templates=TEMPLATES, show_progress=False, **options)
    assert error.value.args[0].count(f"{dim}-dimensional") == 1
    assert_unchanged(model, before)
    assert not any(isinstance(module, ProjectionEditLayer) for module in model.modules())


def test_stacking_the_rest_of_the_space_onto_an_adapter_is_refused_and_the_stack_unchanged(tokenizer):
    model = add_forget_adapter(
        tiny_clip(projection_dim=4), ["cat"], tokenizer, templates=TEMPLATES, show_progress=False
    )
    before, names = state(model), list(model.peft_config)
    with pytest.raises(ValueError, match=REFUSAL):
        model.add_forget_adapter(list(TINY_CLASS_NAMES[4:8]), tokenizer=tokenizer, templates=TEMPLATES)
    assert list(model.peft_config) == names
    assert_unchanged(model, before)


def test_fewer_classes_or_named_classes_to_keep_still_build(tokenizer):
    pixels = random_pixels()
    fewer = add_forget_adapter(
        tiny_clip(projection_dim=4), list(TINY_CLASS_NAMES[:3]), tokenizer, templates=TEMPLATES, show_progress=False
    )
    # the shared direction is kept: rank 3 of 4
    kept = add_forget_adapter(
        tiny_clip(projection_dim=4),
        list(TINY_CLASS_NAMES[:4]),
        tokenizer,
        retain_classes=["ship"],
        templates=TEMPLATES,
        show_progress=False,
    )
    # rank 4, but CCUP keeps its retain set: a trade-off, not a collapse
    ccup = add_forget_adapter(
        tiny_clip(projection_dim=4),
        list(TINY_CLASS_NAMES[:4]),
        tokenizer,
        retain_classes=["ship"],
        method="ccup",
        keep_shared_direction=False,
        templates=TEMPLATES,
        show_progress=False,
    )
    for model in (fewer, kept, ccup):
        output = model.get_image_features(pixel_values=pixels)
        assert getattr(output, "pooler_output", output).norm(dim=1).min() > 1e-2


def test_the_factors_refuse_a_full_rank_forget_set():
    with pytest.raises(ValueError, match=REFUSAL):
        build_edit_factors("nullspace", torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=REFUSAL):
        build_edit_factors("ccup", torch.eye(4, dtype=torch.float64))
    factors = build_edit_factors("ccup", torch.eye(4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    assert factors.forget.shape == (4, 4) and factors.retain.shape == (4, 1)
    assert build_edit_factors("nullspace", torch.eye(4, dtype=torch.float64)[:3]).forget.shape == (4, 3)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "test.parquet", num_images=8)


EVERY_CLASS = ",".join(CLASSES)


def refused(capsys, *flags: str) -> None:
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # one line
    assert "forgets every class of --data" in err, err
    assert "no retain accuracy can be measured" in err and "Forget fewer classes" in err
    for flag in flags:
        assert flag in err, err


def test_eval_refuses_forgetting_every_class_of_the_data(model_dir, data_file, tmp_path, capsys):
    json_path = tmp_path / "report.json"
    assert main(["eval", model_dir, "--data", data_file, "--forget", EVERY_CLASS, "--json", str(json_path)]) == 2
    refused(capsys, "--forget", "--data")
    assert not json_path.exists()


def test_eval_refuses_an_adapter_that_forgets_every_class_of_the_data(model_dir, data_file, tmp_path, capsys):
    from transformers import CLIPModel

    from hf_clip_forget.testing_utils import tiny_tokenizer

    adapter = tmp_path / "everything"
    add_forget_adapter(
        CLIPModel.from_pretrained(model_dir), CLASSES, tiny_tokenizer(), templates=TEMPLATES, show_progress=False
    ).save_pretrained(adapter)
    assert main(["eval", model_dir, "--adapter", str(adapter), "--data", data_file, "--no-cache"]) == 2
    refused(capsys, "--adapter", "--data")


def test_sweep_and_calibrate_refuse_forgetting_every_class_of_the_data(model_dir, data_file, tmp_path, capsys):
    assert main(["sweep", model_dir, "--classes", EVERY_CLASS, "--data", data_file, "--no-cache"]) == 2
    refused(capsys, "--classes", "--data")
    output = tmp_path / "calibrated"
    assert main(["calibrate", model_dir, "--classes", EVERY_CLASS, "--data", data_file, "--split", "test",
                 "--output", str(output), "--no-cache"]) == 2  # fmt: skip
    refused(capsys, "--classes", "--data")
    assert not output.exists()


def test_a_class_without_images_is_not_a_class_left_to_keep(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[*CLASSES, "car"])})
    path = tmp_path / "test.parquet"
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]}, features=features).to_parquet(str(path))
    assert main(["eval", model_dir, "--data", str(path), "--forget", EVERY_CLASS, "--no-cache"]) == 2
    refused(capsys, "--forget")
    assert main(["eval", model_dir, "--data", str(path), "--forget", "cat,dog", "--no-cache"]) == 0
