"""`hf-clip-forget calibrate` end to end on the embedded demo model and a small stratified PACS sample: the adapter, its
card, the JSON report and the plot are written; an unmet budget is said plainly (exit 0, ``"budget_met": false``);
bad requests are one-line errors."""

import json
import os

import pytest

from hf_clip_forget import ForgetPeftModel
from hf_clip_forget.cli import build_parser, main
from hf_clip_forget.models.demo import load_demo_model

from .real_data import needs_pacs, stratified_pacs
from .test_cli_errors import one_error_line


pytestmark = needs_pacs

PER_CELL = 2  # images per (domain, class): 56 images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pacs") / "validation.parquet"
    stratified_pacs(PER_CELL).to_parquet(str(path))
    return str(path)


def test_calibrate_is_a_subcommand():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    assert "calibrate" in commands.choices


def test_calibrate_writes_the_adapter_with_its_card_a_json_report_and_a_plot(data, tmp_path, capsys):
    output, report, plot = tmp_path / "adapter", tmp_path / "calibration.json", tmp_path / "tradeoff.png"
    code = main(["calibrate", "demo", "--classes", "person", "--data", data, "--max-forget", "0.05",
                 "--max-retain-drop", "0.02", "--output", str(output), "--json", str(report), "--plot", str(plot)])  # fmt: skip
    assert code == 0
    result = json.loads(report.read_text())
    assert result["budget"] == {"max_forget": 0.05, "max_retain_drop": 0.02}
    assert result["validation"]["num_images"] == 56 and result["validation"]["forget_images"] == 8
    assert {row["name"] for row in result["per_cell"]} >= {"sketch/person", "photo/dog"}
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["calibration"] == result and config["alpha"] == result["chosen"]["alpha"]
    assert result["budget_met"] is (result["forget_accuracy"]["after"] <= 0.05 and
                                    result["kept_accuracy"]["before"] - result["kept_accuracy"]["after"] <= 0.02)  # fmt: skip
    card = (output / "README.md").read_text()
    assert (
        "data-assisted in its strength, data-free in its directions" in card and result["validation"]["sha256"] in card
    )
    assert plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| sketch/person | forget | 2 |" in printed
    assert ("budget met: adapter `default`" if result["budget_met"] else "BUDGET NOT MET") in printed
    loaded = ForgetPeftModel.from_pretrained(load_demo_model()[0], output)
    assert loaded.peft_config["default"].calibration == result


def test_a_budget_no_strength_meets_is_said_plainly_and_the_run_still_succeeds(data, tmp_path, capsys):
    report = tmp_path / "calibration.json"
    # one weak strength only: α = 0.05 leaves most persons recognised, so forget ≤ 0 cannot be met
    code = main(["calibrate", "demo", "--classes", "person", "--data", data, "--alphas", "0.05", "--refine", "0",
                 "--max-forget", "0", "--output", str(tmp_path / "adapter"), "--json", str(report)])  # fmt: skip
    assert code == 0
    result = json.loads(report.read_text())
    assert result["budget_met"] is False and result["chosen"] == {"alpha": 0.05}
    assert result["forget_accuracy"]["after"] > 0
    assert "BUDGET NOT MET" in capsys.readouterr().out
    assert "budget NOT met" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "person", "--max-forget", "1.5"], "--max-forget must be in [0, 1]"),
        (["--classes", "person", "--alphas", "0.5,x"], "--alphas '0.5,x': give numbers"),
        (["--classes", "person", "--refine", "-1"], "--refine must be an integer >= 0"),
        (["--classes", "persn"], "did you mean 'person'"),
        (["--classes", "dog", "--domains", "skech", "--retain-domains", "photo"], "did you mean 'sketch'"),
    ],
)
def test_bad_requests_are_one_line_errors(data, tmp_path, extra, message, capsys):
    assert main(["calibrate", "demo", "--data", data, *extra, "--output", str(tmp_path / "adapter")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "adapter").exists()


def test_calibrate_reuses_the_image_features_eval_cached_for_the_same_file(data, tmp_path, monkeypatch):
    """The feature cache is keyed on the data's files as `eval` keys it: calibrating on a file `eval` (or `forget
    --eval-data`) already embedded adds no second entry and embeds no image."""
    import huggingface_hub.constants

    from hf_clip_forget.cli import cached_image_features, load_dual_encoder
    from hf_clip_forget.evaluation import cache as feature_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "home"))
    model, _, processor = load_dual_encoder("demo")
    cached_image_features(model, processor, data, "train")  # what `eval --data PATH --split train` stores
    folder = tmp_path / "home" / "hf_clip_forget" / "features"
    entries = sorted(os.listdir(folder))

    def no_embedding(*args, **kwargs):
        raise AssertionError("calibrate embedded images that were cached")

    monkeypatch.setattr(feature_cache, "embed_images", no_embedding)
    assert main(["calibrate", "demo", "--classes", "person", "--data", data, "--alphas", "0.5,1", "--refine", "0",
                 "--max-forget", "0.5", "--max-retain-drop", "0.5", "--output", str(tmp_path / "adapter")]) == 0  # fmt: skip
    assert sorted(os.listdir(folder)) == entries
