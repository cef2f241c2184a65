"""Model cards, push_to_hub of adapters and merged models, and base-model fingerprints, against a loopback Hub."""

import socket

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import CLIPModel

from hf_clip_forget import ForgetEvaluation, ForgetPeftModel, HubUploadError
from hf_clip_forget.hub import escape_markdown
from hf_clip_forget.testing_utils import tiny_clip, tiny_dual_encoder, tiny_image_processor

from .conftest import assert_same_state, image_features, state_snapshot


def edited_model(tokenizer, base=None, **options):
    base = base if base is not None else tiny_clip()
    model = base.add_forget_adapter(["cat", "dog"], tokenizer=tokenizer, show_progress=False, **options)
    return model.add_forget_adapter(["truck"], tokenizer=tokenizer, adapter_name="vehicles", show_progress=False)


def front_matter(readme: bytes) -> dict:
    return yaml.safe_load(readme.decode().split("---")[1])


def test_push_adapter_then_download_gives_identical_outputs(fake_hub, tokenizer, pixels):
    model = edited_model(tokenizer)
    commit = model.push_to_hub("tester/clip-forget-pets")
    files = fake_hub.repos["tester/clip-forget-pets"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "vehicles/adapter_config.json"} <= set(
        files
    )
    assert len(fake_hub.commits["tester/clip-forget-pets"]) == 1  # adapters and card in one commit
    assert commit.oid == fake_hub.revision("tester/clip-forget-pets")

    reloaded = ForgetPeftModel.from_pretrained(tiny_clip(), "tester/clip-forget-pets")
    assert sorted(reloaded.active_adapters) == ["default", "vehicles"]
    assert torch.equal(image_features(reloaded, pixels), image_features(model, pixels))
    single = PeftModel.from_pretrained(
        tiny_clip(), "tester/clip-forget-pets", subfolder="vehicles", adapter_name="vehicles"
    )
    assert single.peft_config["vehicles"].forgotten_classes == ["truck"]


def test_the_pushed_card_is_ours_and_carries_the_metadata(fake_hub, tokenizer):
    base = tiny_clip()
    base.name_or_path = "openai/clip-vit-base-patch32"  # as if loaded from the Hub
    base.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    model = edited_model(tokenizer, base, alpha=0.5)
    evaluation = ForgetEvaluation("CIFAR-10", "cifar10", 0.91, 0.01, 0.88, 0.87)
    model.push_to_hub("tester/card-check", evaluations=[evaluation])

    card = ModelCard.load("tester/card-check")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "openai/clip-vit-base-patch32"
    assert {"machine-unlearning", "clip", "hf_clip_forget"} <= set(data["tags"])
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert data["forgotten_classes"] == ["cat", "dog", "truck"]
    metrics = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"forget accuracy": 0.01, "retain accuracy": 0.87}
    text = card.text
    for section in (
        "## Forgotten classes",
        "## Method and hyperparameters",
        "## Stacking order",
        "## Evaluation",
        "## How to load, merge and revert",
        "## Provenance",
    ):
        assert section in text
    assert "| `default` | cat, dog |" in text and "| `vehicles` | truck |" in text
    assert "| 91.0 % | 1.0 % | 88.0 % | 87.0 % |" in text
    assert "0123456789abcdef0123456789abcdef01234567" in text and "peft 0.21" in text
    fingerprint = model.peft_config["default"].base_fingerprints["visual_projection"]["sha256"]
    assert fingerprint in text
    assert 'ForgetPeftModel.from_pretrained(base, "tester/card-check")' in text
    assert "library_name: transformers" not in fake_hub.repos["tester/card-check"]["README.md"].decode()


def test_the_usage_code_in_the_card_runs(fake_hub, tokenizer, pixels):
    model = edited_model(tokenizer)
    model.push_to_hub("tester/usage")
    code = ModelCard.load("tester/usage").text.split("```python")[1].split("```")[0]
    code = code.replace('CLIPModel.from_pretrained("<the base model>")', "make_base()")
    namespace = {"make_base": tiny_clip}
    exec(code, namespace)  # noqa: S102 - the card's own snippet, on the tiny model
    assert isinstance(namespace["original"], CLIPModel)
    assert torch.equal(image_features(namespace["model"], pixels), image_features(tiny_clip(), pixels))


def test_push_merged_model_then_download(fake_hub, tokenizer, pixels):
    model = edited_model(tokenizer)
    expected = image_features(model, pixels)
    weights_before = state_snapshot(model)
    model.push_to_hub("tester/clip-merged", merged=True, tokenizer=tokenizer, image_processor=tiny_image_processor())
    assert_same_state(model, weights_before)  # pushing a merged copy leaves the model itself alone
    files = fake_hub.repos["tester/clip-merged"]
    assert "config.json" in files and "model.safetensors" in files and "adapter_config.json" not in files

    downloaded = CLIPModel.from_pretrained("tester/clip-merged")
    torch.testing.assert_close(image_features(downloaded, pixels), expected, atol=1e-5, rtol=1e-5)
    card = ModelCard.load("tester/clip-merged")
    assert card.data.to_dict()["forgotten_classes"] == ["cat", "dog", "truck"]
    assert card.data.to_dict()["library_name"] == "transformers"
    assert "## How to obtain the original" in card.text and "cannot be recovered from this checkpoint" in card.text


def test_the_dual_encoder_card_names_its_class(fake_hub, tokenizer):
    edited_model(tokenizer, tiny_dual_encoder()).push_to_hub("tester/dual")
    assert "VisionTextDualEncoderModel.from_pretrained" in ModelCard.load("tester/dual").text


SPECIAL_NAMES = ["<script>alert(1)</script>", "**bold** | pipe", "key: value", "- item", "[link](http://x)", '"q" #h']


def test_class_names_with_markdown_html_and_yaml_syntax_render_as_text(fake_hub):
    directions = torch.randn(len(SPECIAL_NAMES), 16, generator=torch.Generator().manual_seed(0))
    from hf_clip_forget import add_forget_adapter

    model = add_forget_adapter(tiny_clip(), SPECIAL_NAMES, text_embeds=directions)
    model.push_to_hub("tester/special-names")
    card = ModelCard.load("tester/special-names")
    assert card.data.to_dict()["forgotten_classes"] == SPECIAL_NAMES  # YAML round trip, not interpreted
    text = card.text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "**bold**" not in text and "[link](http" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `default` |") and "script" in line)
    assert row.replace("\\|", "").count("|") == 6  # 5 cells: the pipe in a name does not open a new one
    assert escape_markdown("a\nb|c") == "a b\\|c"


def test_local_save_writes_our_card(tmp_path, tokenizer):
    edited_model(tokenizer).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["forgotten_classes"] == ["cat", "dog", "truck"] and "## Provenance" in card.text
    assert "base_model" not in card.data.to_dict()  # a from-config model has no Hub id: omitted, never ''


# ------------------------------------------------------------------------------------------------ fingerprints
def test_loading_onto_another_base_is_refused_by_fingerprint(tmp_path, tokenizer, fake_hub):
    edited_model(tokenizer).save_pretrained(tmp_path)
    edited_model(tokenizer).push_to_hub("tester/fingerprinted")
    for source in (tmp_path, "tester/fingerprinted"):
        other = tiny_clip(seed=1)  # same shapes, other weights
        snapshot = state_snapshot(other)
        with pytest.raises(ValueError, match="fingerprint mismatch.*verify_base_fingerprint=False"):
            ForgetPeftModel.from_pretrained(other, source)
        assert_same_state(other, snapshot)
        with pytest.raises(ValueError, match="fingerprint"):
            PeftModel.from_pretrained(tiny_clip(seed=1), source, subfolder="vehicles")
    deliberate = ForgetPeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, verify_base_fingerprint=False)
    assert deliberate.forgotten_classes == {"default": ["cat", "dog"], "vehicles": ["truck"]}
    assert "verify_base_fingerprint" not in (tmp_path / "adapter_config.json").read_text()


def test_the_same_base_in_another_dtype_matches_its_fingerprint(tmp_path, tokenizer):
    edited_model(tokenizer).save_pretrained(tmp_path)
    model = ForgetPeftModel.from_pretrained(tiny_clip(dtype=torch.bfloat16), tmp_path)
    assert sorted(model.peft_config) == ["default", "vehicles"]


# ------------------------------------------------------------------------------------------------ bad input
def test_push_without_a_token_is_refused_before_anything_is_sent(fake_hub, tokenizer, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="No Hugging Face token"):
        edited_model(tokenizer).push_to_hub("tester/no-token")
    assert "tester/no-token" not in fake_hub.repos


def test_push_with_a_wrong_token_is_reported_and_uploads_nothing(fake_hub, tokenizer):
    with pytest.raises(HubUploadError, match="HTTP 401"):
        edited_model(tokenizer).push_to_hub("tester/wrong-token", token="hf_wrong")
    assert "tester/wrong-token" not in fake_hub.repos


def test_push_to_an_unreachable_hub_is_reported(tokenizer):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HubUploadError, match="Could not reach the Hub"):
        edited_model(tokenizer).push_to_hub("tester/unreachable", endpoint=f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("repo_id", ["not a repo id", "a/b/c", "x" * 200 + "/y", ""])
def test_push_to_an_invalid_repo_id_is_refused(repo_id, tokenizer):
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        edited_model(tokenizer).push_to_hub(repo_id)


def test_a_failed_commit_is_not_reported_as_success(fake_hub, tokenizer):
    fake_hub.reject_next_commit = True
    with pytest.raises(HubUploadError, match="rejected the upload"):
        edited_model(tokenizer).push_to_hub("tester/failed-commit")
    assert fake_hub.repos.get("tester/failed-commit") == {}  # the repo exists, nothing was committed


def test_a_failed_local_save_leaves_an_existing_directory_as_it_was(tmp_path, tokenizer, monkeypatch):
    target = tmp_path / "adapter"
    first = edited_model(tokenizer)
    first.save_pretrained(target)
    (target / "notes.txt").write_text("the user's own file")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    import peft.peft_model

    real_save = peft.peft_model.safe_save_file
    calls = []

    def failing_save(tensors, path, *args, **kwargs):  # writes the first adapter, then fails
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save)
    second = tiny_clip().add_forget_adapter(["bird"], tokenizer=tokenizer, show_progress=False)
    second.add_forget_adapter(["ship"], tokenizer=tokenizer, adapter_name="boats", show_progress=False)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left behind

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    second.save_pretrained(target)  # a successful save replaces the old adapters as a whole
    names = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert "vehicles/adapter_config.json" not in names and "boats/adapter_config.json" in names
    assert (target / "notes.txt").read_text() == "the user's own file"


@pytest.mark.parametrize(
    "class_name", ["BlipForImageTextRetrieval", "FlavaModel", "OwlViTForObjectDetection", "CLIPModel"]
)
def test_the_card_states_what_a_family_s_edit_does_not_reach(class_name, tokenizer):
    """BLIP retrieval's matching head, FLAVA's multimodal encoder and a detector's boxes are not edited: the card says
    so (the family layer's `scope`); a family whose joint embeddings are its only path gets no such line."""
    from hf_clip_forget.families import family_of_class
    from hf_clip_forget.hub.card import build_model_card
    from hf_clip_forget.testing_utils import tiny_model

    model = tiny_model(class_name).add_forget_adapter(["truck"], tokenizer=tokenizer, show_progress=False)
    text = str(build_model_card(model))
    scope = family_of_class(class_name).scope
    assert ("**Scope.**" in text) == bool(scope)
    assert scope in text
