"""`expand_neighbours`: the vocabulary words nearest to a forgotten class are forgotten with it, recorded in the
config and the card, rebuilt from the record, and never shift the direction all classes share."""

import pytest
import torch

from hf_clip_forget import ForgetPeftModel, ProjectionEditConfig, add_forget_adapter
from hf_clip_forget.core import IMAGENET_TEMPLATES, class_text_embeddings, nearest_words, shared_direction
from hf_clip_forget.testing_utils import random_pixels, tiny_clip, tiny_tokenizer

from .conftest import image_features, max_abs_cos


WORDS = ["kitten", "kitty", "tabby", "puppy"]


@pytest.fixture(scope="module")
def word_tokenizer():
    return tiny_tokenizer(extra_words=WORDS)


def embeddings(model, tokenizer, names):
    return class_text_embeddings(model, tokenizer, names, IMAGENET_TEMPLATES, show_progress=False).embeddings


def test_the_neighbour_words_are_recorded_and_forgotten_with_the_class(word_tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], word_tokenizer, expand_neighbours=3, show_progress=False)
    words = model.peft_config["default"].neighbour_names["cat"]
    assert len(words) == 3 and "cat" not in words
    assert model.peft_config["default"].rank_pattern == {"visual_projection": 4}  # the class and its 3 words
    edited = image_features(model, random_pixels(batch_size=6))
    with model.disable_adapter():
        unedited = image_features(model, random_pixels(batch_size=6))
        directions = embeddings(model.get_base_model(), word_tokenizer, words)
    assert max_abs_cos(unedited, directions) > 1e-2
    assert max_abs_cos(edited, directions) <= 1e-5


def test_the_words_are_kept_when_saved_and_the_adapter_is_rebuilt_from_them(word_tokenizer, tmp_path):
    model = add_forget_adapter(tiny_clip(), ["cat"], word_tokenizer, expand_neighbours=2, show_progress=False)
    model.save_pretrained(tmp_path)
    loaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path)
    config = loaded.peft_config["default"]
    assert config.neighbour_names == model.peft_config["default"].neighbour_names
    assert config.forget_names() == ["cat", *config.neighbour_names["cat"]]
    assert loaded.verify(tokenizer=word_tokenizer).ok


def test_neighbour_words_do_not_move_the_shared_direction(word_tokenizer):
    """The direction all *classes* share is kept; other names of a forgotten class are not classes and must not
    tilt it towards that class (which kept most of the class: measured on PACS, dog was no longer forgotten)."""
    retain = ["dog", "car", "ship"]
    model = add_forget_adapter(tiny_clip(), ["cat"], word_tokenizer, retain_classes=retain, expand_neighbours=3, templates="imagenet",
                               show_progress=False)  # fmt: skip
    shared = shared_direction(embeddings(tiny_clip(), word_tokenizer, ["cat", *retain])).float()
    edit = model.get_base_model().visual_projection.combined_edit(["default"])
    torch.testing.assert_close(edit.apply(shared[None]), shared[None], atol=1e-5, rtol=0)


def test_a_word_nearer_to_another_named_class_is_not_a_neighbour():
    # "animal" lies between "dog" and "cat", nearer to "cat": it is not another name of "dog"
    dog, cat = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    words = ["puppy", "animal", "rock"]
    vectors = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.1], [0.6, 0.7, 0.0], [0.1, 0.0, 1.0]]), dim=1)
    assert [w for w, _ in nearest_words(dog, words, vectors, 3, exclude=[])][:2] == ["puppy", "animal"]
    assert [w for w, _ in nearest_words(dog, words, vectors, 3, exclude=[], rival_embeddings=cat[None])] == [
        "puppy",
        "rock",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expand_neighbours": -1}, "expand_neighbours` must be an integer >= 0"),
        ({"expand_neighbours": 2, "domains": ["sketch"], "retain_domains": ["photo"]}, "domain-aware"),
        ({"expand_neighbours": 2, "text_embeds": torch.randn(1, 16)}, "no names"),
    ],
)
def test_bad_expansion_requests_are_refused_before_the_model_is_wrapped(word_tokenizer, options, message):
    model = tiny_clip()
    classes = None if "text_embeds" in options else ["cat"]
    with pytest.raises(ValueError, match=message):
        add_forget_adapter(model, classes, word_tokenizer, show_progress=False, **options)
    assert type(model.visual_projection) is torch.nn.Linear


def test_a_config_cannot_name_neighbours_of_a_class_it_does_not_forget():
    with pytest.raises(ValueError, match="not among `forgotten_classes`"):
        ProjectionEditConfig(forgotten_classes=["cat"], neighbour_names={"dog": ["puppy"]})
