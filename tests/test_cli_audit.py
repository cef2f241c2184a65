"""The audit at the user's edges: `hf-clip-forget audit`, `forget --audit`, the card's Audit section and pushes."""

import json

import pytest
from huggingface_hub import ModelCard

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.testing_utils import tiny_clip

from .test_cli import CLASSES, save_tiny_model, write_images
from .test_cli_errors import one_error_line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("adapter") / "cat"
    assert main(["forget", model_dir, "--classes", "cat", "--retain-classes", "dog,bird,ship", "--templates", "single",
                 "--output", str(output)]) == 0  # fmt: skip
    return str(output)


def test_audit_writes_a_json_report_and_a_plot_and_exits_0(model_dir, adapter_dir, tmp_path, capsys):
    out, plot = tmp_path / "audit.json", tmp_path / "audit.png"
    code = main(["audit", model_dir, "--adapter", adapter_dir, "--neighbours", "kitten", "--vocabulary-neighbours",
                 "2", "--json", str(out), "--plot", str(plot)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["forgotten_classes"] == ["cat"] and report["candidate_classes"] == ["cat", "dog", "bird", "ship"]
    neighbours = [row["subject"] for row in report["rows"] if row["probe"] == "neighbour name"]
    assert neighbours[0] == "kitten" and len(neighbours) == 3
    assert plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| probe | class |" in printed and ("leak" in printed)


def test_audit_with_data_runs_the_image_probes(model_dir, adapter_dir, tmp_path):
    data, out = write_images(tmp_path / "images.parquet", num_images=24), tmp_path / "audit.json"
    assert main(["audit", model_dir, "--adapter", adapter_dir, "--data", data, "--vocabulary-neighbours", "0",
                 "--no-cache", "--json", str(out)]) == 0  # fmt: skip
    probes = {row["probe"] for row in json.loads(out.read_text())["rows"]}
    assert {"linear probe", "image→text rank", "zero-shot with neighbours"} <= probes


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--neighbours", "dog"], "classes of the edit themselves"),
        (["--vocabulary-neighbours", "-1"], "--vocabulary-neighbours must be >= 0"),
    ],
)
def test_bad_audit_requests_are_one_line_errors(model_dir, adapter_dir, extra, message, capsys):
    assert main(["audit", model_dir, "--adapter", adapter_dir, *extra]) == 2
    assert message in one_error_line(capsys)


def test_forget_with_audit_puts_the_report_in_the_card_and_beside_the_adapter(model_dir, tmp_path):
    output = tmp_path / "audited"
    assert main(["forget", model_dir, "--classes", "cat", "--retain-classes", "dog,bird", "--templates", "single",
                 "--audit", "--output", str(output)]) == 0  # fmt: skip
    report = json.loads((output / "audit.json").read_text())
    card = ModelCard.load(output / "README.md").text
    assert "## Audit" in card and "No audit was supplied" not in card
    assert report["probes_run"] and all(f"| {probe} |" in card for probe in report["probes_run"])
    assert "What the edit does not remove" in card


def test_an_adapter_saved_without_an_audit_says_so_in_its_card(adapter_dir):
    card = ModelCard.load(f"{adapter_dir}/README.md").text
    assert "No audit was supplied with this model" in card


def test_a_card_refuses_an_audit_of_another_model(tmp_path, tokenizer):
    audited = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, retain_classes=["dog"], show_progress=False)
    report = audited.audit_forgetting(tokenizer, vocabulary_neighbours=0, show_progress=False)
    other = add_forget_adapter(tiny_clip(), ["ship"], tokenizer, retain_classes=["dog"], show_progress=False)
    with pytest.raises(ValueError, match="The audit is of adapters"):
        other.save_pretrained(tmp_path / "other", audit=report)
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_push_to_hub_uploads_the_audit_with_the_adapter(fake_hub, tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, retain_classes=list(CLASSES[1:]), show_progress=False)
    report = model.audit_forgetting(tokenizer, vocabulary_neighbours=0, show_progress=False)
    model.push_to_hub("user/audited-cat", audit=report)
    files = fake_hub.repos["user/audited-cat"]
    assert json.loads(files["audit.json"])["forgotten_classes"] == ["cat"]
    assert "## Audit" in files["README.md"].decode() and "No audit was supplied" not in files["README.md"].decode()


def test_forget_can_expand_the_forget_set_with_neighbour_words(model_dir, tmp_path):
    output = tmp_path / "expanded"
    assert main(["forget", model_dir, "--classes", "cat", "--templates", "single", "--expand-neighbours", "2",
                 "--output", str(output)]) == 0  # fmt: skip
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["expand_neighbours"] == 2 and len(config["neighbour_names"]["cat"]) == 2
    assert "(and its neighbours" in ModelCard.load(output / "README.md").text
