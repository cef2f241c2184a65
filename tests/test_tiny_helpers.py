"""The test helpers users build on (issue 21): the tiny OWL-ViT and OWLv2 models take an edit of a class that sorts
before the template words, with the tokenizer their docstring names."""

import pytest
import torch

from hf_clip_forget.core import encode_prompts
from hf_clip_forget.testing_utils import SPECIAL_TOKENS, tiny_model, tiny_tokenizer


OWL = ["OwlViTForObjectDetection", "Owlv2ForObjectDetection", "OwlViTModel", "Owlv2Model"]


@pytest.mark.parametrize("class_name", OWL)
def test_a_tiny_owl_model_forgets_dog_and_keeps_cat_and_horse(class_name):
    tokenizer = tiny_tokenizer(class_words_last=True)
    model = tiny_model(class_name)
    prompts = ["a photo of a dog.", "a photo of a cat.", "a photo of a horse."]
    embeddings = torch.nn.functional.normalize(encode_prompts(model, tokenizer, prompts, show_progress=False), dim=-1)
    cosines = embeddings @ embeddings.T
    assert (cosines - torch.eye(3)).abs().max() < 0.999  # three different directions, not one
    edited = model.add_forget_adapter(["dog"], tokenizer=tokenizer, retain_classes=["cat", "horse"],
                                      show_progress=False)  # fmt: skip
    assert edited.peft_config["default"].forgotten_classes == ["dog"]


def test_the_tokenizer_reads_a_class_name_at_the_largest_id_of_its_prompt():
    tokenizer = tiny_tokenizer(extra_words=["puppy"], class_words_last=True)
    for word in ("dog", "cat", "horse", "puppy", "airplane"):
        ids = tokenizer(f"a photo of a {word}.")["input_ids"]
        assert max(ids) == tokenizer.convert_tokens_to_ids(word)


def test_the_default_vocabulary_is_still_alphabetical():
    """Other tests were written against the default ids: special tokens, then every word in alphabetical order."""
    vocab = tiny_tokenizer().get_vocab()
    words = sorted((i, w) for w, i in vocab.items() if w not in SPECIAL_TOKENS)
    assert [w for _, w in words] == sorted(w for _, w in words)
    assert [i for i, _ in words] == list(range(len(SPECIAL_TOKENS), len(vocab)))


def test_the_helper_says_which_tokenizer_the_owl_models_need():
    doc = " ".join(tiny_model.__doc__.split())
    assert "tiny_tokenizer(class_words_last=True)" in doc and "A forget embedding is parallel" in doc
