"""The class-name checks every build runs (issue 24): they tokenise all names in a few batched calls, give exactly the
warnings that checking one name at a time gives, and a repeated check calls the tokenizer no more."""

import warnings
import weakref

import pytest

from hf_clip_forget import UnknownNameWarning
from hf_clip_forget.core import known_words
from hf_clip_forget.core.tokenizer_checks import unknown_class_names, warn_about_poorly_tokenized_classes
from hf_clip_forget.testing_utils import tiny_tokenizer


TEMPLATES = ["a photo of a {}.", "a bad photo of the {}."]
#: Real words, plurals, rare words, typos, unknown words, names with separators and digits, a non-Latin script, and a
#: name too long for the text tower (its prompts are truncated).
MIXED = [
    "dog", "Leopards", "giraffe", "elephant", "dgo", "hrose", "persn", "dgo house", "catt", "xyzzy", "qwxz plm",
    "golden_retriever", "t-shirt", "dog 7", "猫", "horse  cart", " ".join(["dog"] * 70), "airplanes", "zebra",
]  # fmt: skip


class Calls:
    """``tokenizer``, recording what each call tokenised; with ``one_text``, refusing a list, as a tokenizer that
    takes one text at a time does (then the checks call it once per text); with ``unknown``, reading that word's id
    as the unknown token (a tokenizer that does not match its vocabulary)."""

    def __init__(self, tokenizer, one_text: bool = False, unknown: str | None = None):
        self._tokenizer, self._one_text, self.calls = tokenizer, one_text, []
        if unknown is not None:
            self.unk_token_id = tokenizer.convert_tokens_to_ids(unknown)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **options):
        if self._one_text and not isinstance(text, str):
            raise TypeError("one text at a time")
        self.calls.append(text)
        return self._tokenizer(text, **options)


@pytest.fixture
def fresh_records(monkeypatch):
    """No tokenizer's names checked yet (the records are shared by every tokenizer that tokenises alike)."""
    monkeypatch.setattr(known_words, "_BY_KEY", {})
    monkeypatch.setattr(known_words, "_BY_OBJECT", weakref.WeakKeyDictionary())


def wordpiece():
    """The demo model's own tokenizer (a 30k-token uncased WordPiece vocabulary)."""
    from transformers import AutoTokenizer

    from hf_clip_forget.models.demo import demo_model_path

    return AutoTokenizer.from_pretrained(demo_model_path())


def checked(tokenizer, names) -> tuple[list, list]:
    """What the checks say of ``names``: the warnings of a build (category and text, in order), and each
    :class:`UnknownNameWarning`'s name, reason and suggestions."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_about_poorly_tokenized_classes(tokenizer, names, TEMPLATES)
    found = [(w.name, w.reason, w.suggestions) for w in unknown_class_names(tokenizer, names)]
    return [(w.category.__name__, str(w.message)) for w in caught], found


@pytest.mark.parametrize(
    ("make", "unknown", "says"),
    [
        (tiny_tokenizer, None, ["Class 'xyzzy' is mostly unknown", "'dgo'", "did you mean 'dog'?", "truncated"]),
        (wordpiece, None, ["'dgo', read as 'd' + '##go'", "did you mean 'dog', 'ago'", "'dgo house'", "truncated"]),
        (tiny_tokenizer, "dog", ["Class 'dog' is mostly unknown", "although its vocabulary holds its words"]),
    ],
    ids=["word-level", "wordpiece", "mismatched"],
)
def test_batched_checks_warn_exactly_as_checking_one_text_at_a_time(make, unknown, says, fresh_records, monkeypatch):
    tokenizer = make()
    tokenizer.model_max_length = 64
    one_at_a_time = Calls(tokenizer, one_text=True, unknown=unknown)
    expected = checked(one_at_a_time, MIXED)
    assert all(isinstance(text, str) for text in one_at_a_time.calls)
    monkeypatch.setattr(known_words, "_BY_KEY", {})  # the same key: forget what the first pass found
    batched = Calls(tokenizer, unknown=unknown)
    assert checked(batched, MIXED) == expected
    assert len(batched.calls) < len(one_at_a_time.calls) / 5  # lists, not one text per call
    messages = " ".join(message for _, message in expected[0])
    assert all(text in messages for text in says), messages


def test_20000_names_take_a_few_tokenizer_calls_and_a_repeat_takes_none(fresh_records):
    tokenizer = Calls(tiny_tokenizer())
    tokenizer.model_max_length = 64
    names = [f"dog cat {i}" for i in range(20_000)]
    names[123], names[15_000] = "hrose", " ".join(["cat"] * 70)
    with warnings.catch_warnings(record=True) as cold:
        warnings.simplefilter("always")
        warn_about_poorly_tokenized_classes(tokenizer, names, TEMPLATES)
    # the names, their words' forms, the longest prompts: one list each
    assert len(tokenizer.calls) == 3 and all(isinstance(call, list) for call in tokenizer.calls)
    assert [type(w.message) for w in cold] == [UnknownNameWarning, UserWarning]
    typo, truncated = (str(w.message) for w in cold)
    assert "'hrose'" in typo and "'cat cat cat" in truncated and "truncated" in truncated
    tokenizer.calls.clear()
    with warnings.catch_warnings(record=True) as warm:
        warnings.simplefilter("always")
        warn_about_poorly_tokenized_classes(tokenizer, names, TEMPLATES)
    assert tokenizer.calls == []
    assert [str(w.message) for w in warm] == [str(w.message) for w in cold]


def test_a_repeat_warns_again_for_the_names_that_deserve_it_and_checks_the_rest_by_one_comparison():
    """Names found fine are remembered per (tokenizer, longest template, token limit): a repeat of only such names
    is one set comparison; a name that was warned about is warned about again on every call."""
    import warnings

    from hf_clip_forget.core.known_words import name_tokens
    from hf_clip_forget.core.tokenizer_checks import warn_about_poorly_tokenized_classes
    from hf_clip_forget.testing_utils import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    names = ["truck", "tree", "trukc"]
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_about_poorly_tokenized_classes(tokenizer, names, ["a photo of a {}."])
        assert [str(w.message).split("'")[1] for w in caught] == ["trukc"]
    from hf_clip_forget.core.tokenizer_checks import _usable_length

    record = name_tokens(tokenizer)
    assert record.clean[("a photo of a {}.", _usable_length(tokenizer))] >= {"truck", "tree"}
    assert "trukc" not in set().union(*record.clean.values())
    calls = []
    original = type(tokenizer).__call__
    try:
        type(tokenizer).__call__ = lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_about_poorly_tokenized_classes(tokenizer, ["tree", "truck"], ["a photo of a {}."])
    finally:
        type(tokenizer).__call__ = original
    assert caught == [] and calls == []
