"""The prompt-embedding cache: a repeated encoding runs no text forward, in this process or a new one; any change
of the text path's weights, the tokenizer or the padding gives fresh embeddings; edited models get what they compute
without it; concurrent writers and corrupt files leave a valid cache."""

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import warnings

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from hf_clip_forget import add_forget_adapter
from hf_clip_forget.core import encode_prompts, prompt_cache, prompt_store, text_path
from hf_clip_forget.core.prompt_cache import PROMPT_CACHE_ENV, prompt_cache_disabled
from hf_clip_forget.core.text_embeddings import _Tokenization
from hf_clip_forget.evaluation import class_embeddings
from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer


PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a sketch of a car.", "itap of a bird.", "a photo of a cat."]
UNIQUE = len(set(PROMPTS))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh HF_HOME and an empty memory cache: the test sees only its own entries."""
    home = tmp_path / "home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})
    monkeypatch.delenv(PROMPT_CACHE_ENV, raising=False)
    return home / "hf_clip_forget" / "prompts"


@contextlib.contextmanager
def text_rows(model):
    """The number of prompts in each forward of ``model``'s text tower (``text_model`` in every tiny family)."""
    seen = []
    tower = (model.get_base_model() if hasattr(model, "get_base_model") else model).text_model
    handle = tower.register_forward_hook(lambda _module, _args, output: seen.append(output[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def relative_error(found, expected) -> float:
    return ((found - expected).norm(dim=1) / expected.norm(dim=1)).max().item()


def entries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors")) if folder.exists() else []


def encode(model, tokenizer, prompts=PROMPTS, **options):
    return encode_prompts(model, tokenizer, prompts, show_progress=False, **options)


# ------------------------------------------------------------------------------------------------ reuse and keys
def test_a_second_encoding_runs_no_text_forward_and_returns_identical_tensors(cache_dir, tokenizer):
    model = tiny_model("CLIPModel")
    with text_rows(model) as first:
        cold = encode(model, tokenizer)
    assert sorted(first) == [1, UNIQUE]  # the one-prompt probe that records the text path, then each prompt once
    with text_rows(model) as second:
        warm = encode(model, tokenizer)
    assert second == [] and torch.equal(warm, cold)
    assert relative_error(cold, encode(model, tokenizer, use_cache=False)) <= 1e-5
    assert len(entries(cache_dir)) == 1


SUBPROCESS = """
import json, os, sys, time, torch
from hf_clip_forget.core import encode_prompts
from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer
prompts, output, barrier, count = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
model, tokenizer = tiny_model("CLIPModel"), tiny_tokenizer()
seen = []
model.text_model.register_forward_hook(lambda _m, _a, out: seen.append(out[0].shape[0]))
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 120
while len(os.listdir(barrier)) < count and time.time() < deadline:  # every process ready: start together
    time.sleep(0.001)
start = time.time()
embeddings = encode_prompts(model, tokenizer, prompts, show_progress=False)
torch.save({"embeddings": embeddings, "rows": seen, "window": [start, time.time()]}, output)
"""


def run_encoding_processes(tmp_path, prompt_sets) -> list[dict]:
    """Encode each prompt set in its own new process (same HF_HOME), all starting at once; their results."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    outputs = [tmp_path / f"result_{i}.pt" for i in range(len(prompt_sets))]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SUBPROCESS, json.dumps(prompts), str(output), str(barrier), str(len(prompt_sets))],
            env=dict(os.environ),
        )
        for prompts, output in zip(prompt_sets, outputs, strict=True)
    ]
    assert [process.wait(timeout=300) for process in processes] == [0] * len(processes)
    return [torch.load(output) for output in outputs]


def test_a_new_process_reads_the_disk_cache(cache_dir, tokenizer, tmp_path):
    expected = encode(tiny_model("CLIPModel"), tokenizer)
    (result,) = run_encoding_processes(tmp_path, [PROMPTS])
    assert result["rows"] == [1]  # the probe only: every prompt came from the file
    assert torch.equal(result["embeddings"], expected)


def test_two_processes_writing_at_once_leave_both_sets_of_rows(cache_dir, tokenizer, tmp_path):
    first, second = ["a photo of a cat.", "a photo of a dog."], ["a sketch of a car.", "itap of a bird."]
    results = run_encoding_processes(tmp_path, [first, second])
    assert [result["rows"] for result in results] == [[1, 2], [1, 2]]
    (start_a, end_a), (start_b, end_b) = (result["window"] for result in results)
    assert start_a < end_b and start_b < end_a  # they did run at the same time
    (entry,) = entries(cache_dir)
    with safe_open(str(cache_dir / entry), "pt") as file:
        assert sorted(json.loads(file.metadata()["prompts"])) == sorted(first + second)
    model = tiny_model("CLIPModel")
    with text_rows(model) as rows:
        both = encode(model, tokenizer, first + second)
    assert rows == [1]
    assert torch.equal(both, torch.cat([results[0]["embeddings"], results[1]["embeddings"]]))


def test_changing_a_weight_in_place_gives_fresh_embeddings(cache_dir, tokenizer):
    model = tiny_model("CLIPModel")
    before = encode(model, tokenizer)
    for parameter in (model.text_model.encoder.layers[0].mlp.fc1.weight, model.text_projection.weight):
        with torch.no_grad():
            parameter.mul_(1.5)
        after = encode(model, tokenizer)
        assert (after - before).abs().max() > 1e-3
        assert relative_error(after, encode(model, tokenizer, use_cache=False)) <= 1e-5
        before = after
    assert len(entries(cache_dir)) == 3


def test_a_vision_weight_is_not_part_of_the_key_and_a_text_weight_is(cache_dir, tokenizer):
    model = tiny_model("CLIPModel")
    path = text_path.text_path(model, _Tokenization.of(model, tokenizer))
    key = text_path.text_path_fingerprint(model, path)
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.add_(1.0)
    assert text_path.text_path_fingerprint(model, path) == key
    with torch.no_grad():
        model.text_model.final_layer_norm.bias.add_(1.0)
    assert text_path.text_path_fingerprint(model, path) != key


@pytest.mark.parametrize("adapter", [None, "unmerged", "merged"])
def test_tensor_hashes_are_memoised_until_a_tensor_changes(tokenizer, monkeypatch, adapter):
    model = tiny_model("CLIPModel")
    plain = text_path.text_path_fingerprint(model, text_path.text_path(model, _Tokenization.of(model, tokenizer)))
    if adapter is not None:
        model = add_forget_adapter(model, ["cat"], tokenizer, target="text", templates=["{}"], show_progress=False)
        if adapter == "merged":
            model.merge_adapter()
        model = model.get_base_model()
    path = text_path.text_path(model, _Tokenization.of(model, tokenizer))
    assert text_path.text_path_fingerprint(model, path) == plain  # the unedited weights, whatever the adapter
    calls, sha256 = [], text_path.hashlib.sha256

    def counted(*args):
        calls.append(args)
        return sha256(*args)

    monkeypatch.setattr(text_path.hashlib, "sha256", counted)
    text_path.text_path_fingerprint(model, path)
    assert len(calls) == 1  # the combined digest only: no tensor hashed again
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight[0, 0] += 1.0
    assert text_path.text_path_fingerprint(model, path) != plain
    assert len(calls) == 3  # the combined digest and the one changed tensor


def test_another_tokenizer_or_padding_gives_fresh_embeddings(cache_dir, tokenizer):
    model = tiny_model("CLIPModel")
    encode(model, tokenizer)
    other = tiny_tokenizer(extra_words=["aardvark"])  # another vocabulary: other ids for the same words
    with text_rows(model) as rows:
        found = encode(model, other)
    assert sum(rows) == UNIQUE and relative_error(found, encode(model, other, use_cache=False)) <= 1e-5
    left = tiny_tokenizer()
    left.padding_side = "left"  # CLIP reads the end-of-text token's position: left padding changes it
    with text_rows(model) as rows:
        found = encode(model, left)
    assert sum(rows) == UNIQUE and relative_error(found, encode(model, left, use_cache=False)) <= 1e-5
    short = tiny_tokenizer()
    short.model_max_length = 4  # truncated prompts: the key holds the maximum length
    with text_rows(model) as rows:
        truncated = encode(model, short)
    assert sum(rows) == UNIQUE and relative_error(truncated, encode(model, short, use_cache=False)) <= 1e-5
    assert (truncated - encode(model, tokenizer)).abs().max() > 1e-3
    assert len(entries(cache_dir)) == 4


def test_use_cache_false_the_environment_variable_and_the_context_bypass_it(cache_dir, tokenizer, monkeypatch):
    model = tiny_model("CLIPModel")
    for _ in range(2):
        with text_rows(model) as rows:
            encode(model, tokenizer, use_cache=False)
        assert rows == [UNIQUE]
        with text_rows(model) as rows:
            class_embeddings(
                model, tokenizer, ["cat", "dog"], ["a photo of a {}."], show_progress=False, use_cache=False
            )
        assert rows == [2]
        with prompt_cache_disabled(), text_rows(model) as rows:
            encode(model, tokenizer)
        assert rows == [UNIQUE]
    monkeypatch.setenv(PROMPT_CACHE_ENV, "0")
    with text_rows(model) as rows:
        encode(model, tokenizer)
    assert rows == [UNIQUE] and entries(cache_dir) == []
    monkeypatch.setenv(PROMPT_CACHE_ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{PROMPT_CACHE_ENV}='sometimes' is not understood"):
        encode(model, tokenizer)


def test_a_model_in_training_mode_is_encoded_without_the_cache(cache_dir, tokenizer):
    model = tiny_model("CLIPModel").train()  # dropout would make every forward differ
    for _ in range(2):
        with text_rows(model) as rows:
            encode(model, tokenizer)
        assert rows[-1] == UNIQUE  # every prompt, each time (after the probe, the first time)
    assert entries(cache_dir) == []


def test_a_corrupt_or_altered_file_is_recomputed_and_rewritten(cache_dir, tokenizer, monkeypatch):
    model = tiny_model("CLIPModel")
    expected = encode(model, tokenizer)
    (entry,) = entries(cache_dir)
    path = cache_dir / entry
    with safe_open(str(path), "pt") as file:
        metadata, rows = file.metadata(), file.get_tensor("embeddings")
    altered = rows.clone()
    altered[0, 0] += 1.0
    for damage in (
        lambda: path.write_bytes(b"not safetensors"),
        lambda: save_file({"embeddings": altered}, path, metadata),
    ):
        damage()
        monkeypatch.setattr(prompt_cache, "_MEMORY", {})
        with pytest.warns(UserWarning, match="Ignoring the cached prompt embeddings"), text_rows(model) as seen:
            assert torch.equal(encode(model, tokenizer), expected)
        assert seen == [UNIQUE]
        monkeypatch.setattr(prompt_cache, "_MEMORY", {})
        with warnings.catch_warnings(), text_rows(model) as seen:  # rewritten: read back, no warning, no forward
            warnings.simplefilter("error")
            assert torch.equal(encode(model, tokenizer), expected)
        assert seen == []


def read_entry(path):
    with safe_open(str(path), "pt") as file:
        return dict(file.metadata()), file.get_tensor("embeddings")


def rows_only_digest(rows) -> str:
    """The checksum of cache format 1: sha256 of the rows alone, which anyone could recompute after an edit."""
    return hashlib.sha256(rows.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def assert_recomputed(model, tokenizer, monkeypatch, truth, prompts=PROMPTS):
    """A fresh process (empty memory) warns about the file, returns what the model computes, and rewrites it."""
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})
    with pytest.warns(UserWarning, match="Ignoring the cached prompt embeddings"):
        found = encode(model, tokenizer, prompts)
    assert relative_error(found, truth) <= 1e-5
    monkeypatch.setattr(prompt_cache, "_MEMORY", {})
    with warnings.catch_warnings(), text_rows(model) as seen:  # rewritten: valid again, read back without a forward
        warnings.simplefilter("error")
        assert relative_error(encode(model, tokenizer, prompts), truth) <= 1e-5
    assert seen == []


def test_swapped_prompts_or_an_edited_row_with_a_rows_only_checksum_are_recomputed(cache_dir, tokenizer, monkeypatch):
    model = tiny_model("CLIPModel")
    encode(model, tokenizer)
    truth = encode(model, tokenizer, use_cache=False)
    (entry,) = entries(cache_dir)
    path = cache_dir / entry
    metadata, rows = read_entry(path)
    prompts = json.loads(metadata["prompts"])
    swapped = [prompts[1], prompts[0], *prompts[2:]]  # "a photo of a cat." ↔ "a photo of a dog."
    edited = rows.clone()
    edited[0] = -edited[0]
    for damaged_metadata, damaged_rows in (
        ({**metadata, "prompts": json.dumps(swapped)}, rows),  # the checksum left as it was
        ({**metadata, "prompts": json.dumps(swapped), "sha256": rows_only_digest(rows)}, rows),
        ({**metadata, "sha256": rows_only_digest(edited)}, edited),  # a row edited, the old-style checksum re-forged
    ):
        save_file({"embeddings": damaged_rows}, path, damaged_metadata)
        assert_recomputed(model, tokenizer, monkeypatch, truth)


def test_a_checksum_recomputed_by_the_current_recipe_does_not_rebind_a_row(cache_dir, tokenizer, monkeypatch):
    """Each row's identity hashes its prompt and key: prompts swapped, or rows moved to another key's file, with the
    file checksum recomputed, are still not found under the wrong prompt or key."""
    model = tiny_model("CLIPModel")
    encode(model, tokenizer)
    truth = encode(model, tokenizer, use_cache=False)
    (entry,) = entries(cache_dir)
    path = cache_dir / entry
    metadata, rows = read_entry(path)
    key, prompts, ids = metadata["key"], json.loads(metadata["prompts"]), json.loads(metadata["rows"])
    swapped = [prompts[1], prompts[0], *prompts[2:]]
    digest = prompt_store.file_digest(key, swapped, ids, rows)
    save_file({"embeddings": rows}, path, {**metadata, "prompts": json.dumps(swapped), "sha256": digest})
    assert_recomputed(model, tokenizer, monkeypatch, truth)

    with torch.no_grad():  # another key: the same rows copied under its name, key and a matching checksum
        model.text_projection.weight.mul_(1.5)
    encode(model, tokenizer)
    other_truth = encode(model, tokenizer, use_cache=False)
    (other,) = [name for name in entries(cache_dir) if name != entry]
    other_key = read_entry(cache_dir / other)[0]["key"]
    moved = {**metadata, "key": other_key, "sha256": prompt_store.file_digest(other_key, prompts, ids, rows)}
    save_file({"embeddings": rows}, cache_dir / other, moved)
    assert_recomputed(model, tokenizer, monkeypatch, other_truth)


# ---------------------------------------------------------------------------------------------- edited models
def states(model, mergeable: bool):
    """The adapter active, bypassed, disabled, then merged (when every edited layer can be): a name and a factory
    of the context that puts the model in that state."""
    yield "active", contextlib.nullcontext
    yield "bypassed", model.base_model.edits_bypassed
    yield "disabled", model.disable_adapter
    if mergeable:
        model.merge_adapter()
        yield "merged", contextlib.nullcontext


@pytest.mark.parametrize("target", ["text", "both"])
@pytest.mark.parametrize("class_name", ["CLIPModel", "FlavaModel", "SiglipModel", "ClapModel"])
def test_edited_models_get_what_they_compute_without_the_cache(cache_dir, tokenizer, class_name, target):
    model = add_forget_adapter(
        tiny_model(class_name), ["cat"], tokenizer, retain_classes=["dog", "car"], target=target,
        templates=["a photo of a {}."], show_progress=False,
    )  # fmt: skip
    encode(model, tokenizer)  # fills the cache with the unedited embeddings
    with model.base_model.edits_bypassed():
        unedited = encode(model, tokenizer, use_cache=False)
    mergeable = not (class_name == "SiglipModel" and target == "both")  # SigLIP's image head is not a Linear
    for state, context in states(model, mergeable):
        with context(), text_rows(model) as rows:
            cached = encode(model, tokenizer)
        with context():
            direct = encode(model, tokenizer, use_cache=False)
        assert rows == [], state  # one entry serves every state of the adapter
        assert relative_error(cached, direct) <= 1e-5, state
        edited = state in ("active", "merged")
        assert ((cached - unedited).abs().max() > 1e-4) == edited, state


def test_a_repeated_edit_encodes_no_prompt_and_builds_the_same_factors(cache_dir, tokenizer):
    def build(**options):
        model = tiny_model("CLIPModel")
        with text_rows(model) as rows:
            edited = add_forget_adapter(
                model, ["cat"], tokenizer, retain_classes=["dog", "car"], target="both", templates="imagenet",
                show_progress=False, **options,
            )  # fmt: skip
        return edited.base_model.forget_layers(), sum(rows)

    uncached, rows = build(use_cache=False)
    assert rows >= 3 * 80  # every prompt of the three classes, and the anchor
    build()
    cached, rows = build()
    assert rows == 1  # the probe of a new model object only
    for name, layer in cached.items():
        expected = uncached[name].projection_edit_forget["default"]
        torch.testing.assert_close(layer.projection_edit_forget["default"], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- the key's scope
class TensorsRead(TorchFunctionMode):
    """Records every tensor passed to a torch function: the parameters and buffers a forward reads."""

    def __init__(self):
        super().__init__()
        self.ids = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ids.update(id(value) for value in tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor))
        return func(*args, **kwargs)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("class_name", ["CLIPModel", "SiglipModel", "FlavaModel", "ClapModel"])
def test_the_key_covers_every_tensor_the_unedited_text_forward_reads(tokenizer, class_name, merged):
    model = add_forget_adapter(
        tiny_model(class_name), ["cat"], tokenizer, target="text", templates=["a photo of a {}."], show_progress=False
    )
    if merged:
        model.merge_adapter()
    base = model.get_base_model()
    tokenize = _Tokenization.of(base, tokenizer)
    path = text_path.text_path(base, tokenize)
    named = {id(value): name for name, value in [*base.named_parameters(), *base.named_buffers()]}
    with text_path.edits_bypassed(base), torch.no_grad(), TensorsRead() as read:
        encode_prompts(base, tokenizer, PROMPTS, show_progress=False, use_cache=False)
    covered = {id(value): name for name, value in text_path.text_path_tensors(base, path).items()}
    missing = sorted(named[i] for i in read.ids & set(named) if i not in covered)
    assert not missing, f"read by the text forward but not in the key: {missing}"
    factors = [f for layer in model.base_model.forget_layers().values() for f in layer.projection_edit_forget.values()]
    assert factors and not {id(factor) for factor in factors} & set(covered)
    # under the plain layer's names, merged or not: the same key with or without an adapter
    assert sorted(covered.values()) == sorted(text_path.text_path_tensors(tiny_model(class_name), path))
