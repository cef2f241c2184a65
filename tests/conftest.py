import atexit
import os
import shutil
import tempfile

import pytest

from .fake_hub import FakeHub


# A loopback Hub for the whole session. huggingface_hub reads HF_ENDPOINT when it is imported, so the server starts
# and the environment is set before anything below imports it.
FAKE_HUB = FakeHub(token="hf_test_token").__enter__()
SESSION_HF_HOME = tempfile.mkdtemp(prefix="hf_home_")
atexit.register(shutil.rmtree, SESSION_HF_HOME, ignore_errors=True)  # a session's Hub cache never outlives it
os.environ.update(
    HF_ENDPOINT=FAKE_HUB.endpoint,
    HF_TOKEN=FAKE_HUB.token,
    HF_HOME=SESSION_HF_HOME,
    HF_HUB_DISABLE_TELEMETRY="1",
)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)

import torch  # noqa: E402

import hf_clip_forget  # noqa: E402, F401  (registers the peft method and the model methods)
from hf_clip_forget.core import class_text_embeddings, resolve_templates  # noqa: E402
from hf_clip_forget.families import family_of  # noqa: E402
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_dual_encoder, tiny_tokenizer  # noqa: E402


MODEL_FACTORIES = {"clip": tiny_clip, "dual_encoder": tiny_dual_encoder}


@pytest.fixture
def fake_hub():
    """The session's loopback Hub, with upload failures reset."""
    FAKE_HUB.reject_next_commit = False
    return FAKE_HUB


#: Test modules that set up the prompt cache themselves (through HF_HOME) to test it.
CACHE_TESTS = ("test_prompt_cache", "test_prompt_cache_shards", "test_cli_cache")


@pytest.fixture(autouse=True)
def empty_prompt_cache(request, tmp_path_factory, monkeypatch):
    """Every test starts with an empty prompt-embedding cache (a folder of its own, nothing in memory), so that its
    numbers never depend on which prompts earlier tests encoded, and in which batches (rounding-level differences)."""
    from hf_clip_forget.core import prompt_cache

    if request.module.__name__.rpartition(".")[2] in CACHE_TESTS:
        return
    folder = str(tmp_path_factory.mktemp("prompt-cache"))
    monkeypatch.setattr(prompt_cache, "prompt_cache_dir", lambda: folder)
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def make_model(request):
    """A factory of fresh tiny models, once per model class (CLIPModel, VisionTextDualEncoderModel)."""
    return MODEL_FACTORIES[request.param]


@pytest.fixture
def pixels():
    return random_pixels(batch_size=6)


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_features(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return features(model.get_image_features(pixel_values=pixel_values))


def text_features(model, tokenizer, texts) -> torch.Tensor:
    inputs = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return features(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )


def class_embeddings(model, tokenizer, classes, templates=None, retain_named=False) -> torch.Tensor:
    """Normalised, template-averaged class embeddings (float32) of an *unedited* model, with ``templates`` or the
    ones an image-side edit uses by default (the family's: one template when it names retain classes, else 80)."""
    if templates is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        templates = resolve_templates(family_of(base).templates_for("visual", retain_named))
    return class_text_embeddings(model, tokenizer, classes, templates, show_progress=False).embeddings.float()


def max_abs_cos(feats: torch.Tensor, directions: torch.Tensor) -> float:
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    directions = torch.nn.functional.normalize(directions.float(), dim=-1)
    return (feats @ directions.T).abs().max().item()


def projection_weights(model) -> dict[str, torch.Tensor]:
    """Clones of every projection weight, wherever the layers are wrapped."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if name.endswith("projection.weight") or name.endswith("projection.base_layer.weight")
    }


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_state(model, snapshot) -> None:
    state = model.state_dict()
    assert set(state) == set(snapshot), "the model's modules changed"
    for name, value in snapshot.items():
        assert torch.equal(state[name], value), f"{name} changed"
