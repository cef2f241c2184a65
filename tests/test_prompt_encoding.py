"""How prompts are encoded (issue 13): each distinct prompt once, in batches of similar token length, rows returned
in the caller's order and equal to encoding each prompt alone."""

from __future__ import annotations

import pytest
import torch

from hf_clip_forget.core import encode_prompts
from hf_clip_forget.core.text_embeddings import _length_sorted_batches, _Tokenization
from hf_clip_forget.testing_utils import tiny_model, tiny_tokenizer


# Lengths alternate short / long, so that batches cut in the given order would each pad to the longest prompt.
PROMPTS = [
    "a cat.",
    "a very blurry black and white photo of the small dog.",
    "a bird.",
    "a close-up low resolution photo of a large car.",
    "a cat.",
    "a dog.",
    "a pixelated photo of the hard to see bird in a tree.",
    "a car.",
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("CLIPModel").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def text_inputs(model):
    """The ``input_ids`` shape of every forward of the text tower."""
    seen = []
    handle = model.text_model.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return seen, handle


def test_rows_come_back_in_the_given_order_and_equal_encoding_each_prompt_alone(model, tokenizer):
    found = encode_prompts(model, tokenizer, PROMPTS, batch_size=3, show_progress=False, use_cache=False)
    alone = torch.cat([encode_prompts(model, tokenizer, [p], show_progress=False, use_cache=False) for p in PROMPTS])
    assert found.shape == alone.shape
    # float32, batched and padded vs one prompt at a time: the tiny text tower's sums (up to 64 positions, widths 32
    # and 37) run in another order, each off by up to about length × eps relative to the activations' scale
    torch.testing.assert_close(
        found, alone, rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(alone.abs().max())
    )
    assert torch.equal(found[0], found[4])  # the same prompt twice: the same row


def test_each_distinct_prompt_is_encoded_once_in_batches_of_similar_length(model, tokenizer):
    seen, handle = text_inputs(model)
    try:
        encode_prompts(model, tokenizer, PROMPTS, batch_size=3, show_progress=False, use_cache=False)
    finally:
        handle.remove()
    assert sum(rows for rows, _ in seen) == len(set(PROMPTS))
    tokenize = _Tokenization.of(model, tokenizer)
    distinct = list(dict.fromkeys(PROMPTS))
    lengths = tokenize.lengths(distinct)
    in_given_order = sum(len(distinct[i : i + 3]) * max(lengths[i : i + 3]) for i in range(0, len(distinct), 3))
    padded = sum(rows * width for rows, width in seen)
    assert padded == sum(len(b) * max(lengths[i] for i in b) for b in _length_sorted_batches(tokenize, distinct, 3))
    assert padded < in_given_order  # sorting by length pads less than the given order would


def test_the_encoded_rows_are_ordinary_tensors_usable_with_autograd(model, tokenizer):
    found = encode_prompts(model, tokenizer, PROMPTS[:3], show_progress=False, use_cache=False)
    assert not found.is_inference()
    weight = torch.ones(found.shape[1], requires_grad=True)
    (found @ weight).sum().backward()  # an inference-mode tensor could not be saved for backward
    assert weight.grad is not None
