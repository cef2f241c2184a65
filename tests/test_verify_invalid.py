"""A tampered adapter whose config cannot be rebuilt is a finding of `verify` ("invalid", not ok; exit 1 in the CLI),
never a crash; errors other than the rebuild's own refusals stay visible."""

import json

import pytest
from transformers import CLIPModel

from hf_clip_forget import ForgetPeftModel, add_forget_adapter
from hf_clip_forget.api import verify as verify_module
from hf_clip_forget.api.verify import verify_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.testing_utils import TINY_CLASS_NAMES, tiny_clip, tiny_image_processor


TEMPLATES = ["a photo of a {}."]


def saved_and_loaded(tmp_path, tokenizer, **options) -> ForgetPeftModel:
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, templates=TEMPLATES, show_progress=False, **options)
    model.save_pretrained(tmp_path / "adapter")
    return ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")


def test_an_adapter_naming_no_forgotten_class_is_reported_invalid(tmp_path, tokenizer):
    model = saved_and_loaded(tmp_path, tokenizer)
    assert verify_forget_adapter(model, tokenizer=tokenizer).ok
    model.peft_config["default"].forgotten_classes = []
    report = verify_forget_adapter(model, tokenizer=tokenizer)
    (result,) = report.results
    assert not report.ok and report.to_dict()["ok"] is False
    assert result.status == "invalid" and result.max_difference is None
    assert "forgotten_classes" in result.detail and "\n" not in result.detail
    assert "invalid" in str(report)


@pytest.mark.parametrize(
    ("options", "status"),
    [
        ({"retain_classes": ["dog", "car"]}, "invalid"),  # nullspace with the shared direction: needs retain classes
        ({"retain_classes": ["dog", "car"], "method": "ccup"}, "invalid"),  # CCUP with the shared direction
        ({"retain_classes": ["dog", "car"], "method": "ccup", "keep_shared_direction": False}, "mismatch"),
    ],
)
def test_an_adapter_whose_retain_classes_were_emptied_is_not_a_match(tmp_path, tokenizer, options, status):
    model = saved_and_loaded(tmp_path, tokenizer, **options)
    model.peft_config["default"].retain_classes = []
    report = verify_forget_adapter(model, tokenizer=tokenizer)
    assert not report.ok and report.results[0].status == status
    if status == "invalid":
        assert "retain_classes" in report.results[0].detail


def test_each_adapter_gets_its_own_verdict(tmp_path, tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, templates=TEMPLATES, show_progress=False)
    model.add_forget_adapter(["dog"], tokenizer=tokenizer, adapter_name="dogs", templates=TEMPLATES)
    model.peft_config["default"].forgotten_classes = []
    report = verify_forget_adapter(model, tokenizer=tokenizer)
    assert [(r.adapter_name, r.status) for r in report.results] == [("default", "invalid"), ("dogs", "match")]
    assert not report.ok


def test_other_errors_of_the_rebuild_are_not_hidden(tmp_path, tokenizer, monkeypatch):
    model = saved_and_loaded(tmp_path, tokenizer)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a finding")

    monkeypatch.setattr(verify_module, "build_adapter", broken)
    with pytest.raises(RuntimeError, match="a bug, not a finding"):
        verify_forget_adapter(model, tokenizer=tokenizer)


def test_the_cli_reports_an_adapter_whose_config_cannot_be_rebuilt_and_exits_1(tmp_path, tokenizer, capsys):
    """Tampered so that the loader still accepts it (it cannot tell without building): the config now names as
    many classes as the tiny model has embedding dimensions, which no edit may forget all at once."""
    base_dir = tmp_path / "base"
    tiny_clip().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tiny_image_processor().save_pretrained(base_dir)
    adapter = tmp_path / "adapter"
    add_forget_adapter(
        CLIPModel.from_pretrained(base_dir), ["cat"], tokenizer, templates=TEMPLATES, show_progress=False
    ).save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["forgotten_classes"] = list(TINY_CLASS_NAMES[:16])
    config_path.write_text(json.dumps(config))

    report_path = tmp_path / "report.json"
    assert main(["verify", str(base_dir), str(adapter), "--json", str(report_path)]) == 1
    out = capsys.readouterr().out
    assert "invalid" in out and "span the whole 16-dimensional" in out and "NOT VERIFIED" in out
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["adapters"][0]["status"] == "invalid"
