"""`hf-clip-forget verify MODEL ADAPTER`: recompute the edit from the adapter's recorded classes and compare."""

import json

from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.testing_utils import tiny_clip, tiny_image_processor


WEIGHTS = "adapter_model.safetensors"


def test_verify_passes_an_honest_adapter_and_fails_one_whose_factors_forget_something_else(
    tmp_path, tokenizer, capsys
):
    base_dir = tmp_path / "base"
    tiny_clip().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tiny_image_processor().save_pretrained(base_dir)
    for classes in (["dog"], ["cat"]):
        model = CLIPModel.from_pretrained(base_dir)
        add_forget_adapter(model, classes, tokenizer, show_progress=False).save_pretrained(tmp_path / classes[0])

    assert main(["verify", str(base_dir), str(tmp_path / "dog"), "--json", str(tmp_path / "ok.json")]) == 0
    assert "verified" in capsys.readouterr().out
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] is True

    # the card and config still say "dog"; the factors are those of "cat", with checksums to match
    tensors = load_file(tmp_path / "dog" / WEIGHTS)
    tensors.update(load_file(tmp_path / "cat" / WEIGHTS))
    save_file(tensors, tmp_path / "dog" / WEIGHTS)
    config_path = tmp_path / "dog" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["factor_checksums"] = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["factor_checksums"]
    config_path.write_text(json.dumps(config))
    assert main(["verify", str(base_dir), str(tmp_path / "dog")]) == 1
    out = capsys.readouterr().out
    assert "mismatch" in out and "NOT VERIFIED" in out


def test_an_adapter_without_its_checks_needs_trust_unverified_and_is_reported_unverified(tmp_path, tokenizer, capsys):
    base_dir = tmp_path / "base"
    tiny_clip().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tiny_image_processor().save_pretrained(base_dir)
    add_forget_adapter(CLIPModel.from_pretrained(base_dir), ["dog"], tokenizer, show_progress=False).save_pretrained(
        tmp_path / "dog"
    )
    config_path = tmp_path / "dog" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["factor_checksums"], config["base_fingerprints"]  # deleting a check must not switch it off
    config_path.write_text(json.dumps(config))
    assert main(["verify", str(base_dir), str(tmp_path / "dog")]) == 2
    assert "trust_unverified" in capsys.readouterr().err
    assert main(["--trust-unverified", "verify", str(base_dir), str(tmp_path / "dog")]) == 0
    assert "unverified load" in capsys.readouterr().out
