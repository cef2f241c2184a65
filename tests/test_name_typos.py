"""Typos in class and domain names are not accepted silently: the API warns (`UnknownNameWarning`, naming the closest
known words), the command line refuses (exit 2, one `error:` line) unless `--allow-unknown-names`."""

import json
import time
import warnings

import pytest

import hf_clip_forget
from hf_clip_forget import UnknownNameWarning, add_forget_adapter
from hf_clip_forget.cli import main
from hf_clip_forget.core import known_words, tokenizer_checks
from hf_clip_forget.core.tokenizer_checks import unknown_class_names, unknown_domain_names
from hf_clip_forget.testing_utils import tiny_clip

from .test_cli import save_tiny_model
from .test_cli_errors import one_error_line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def wordpiece():
    """The demo model's own tokenizer (all-MiniLM-L6-v2: a 30k-token uncased WordPiece vocabulary)."""
    from transformers import AutoTokenizer

    from hf_clip_forget.models.demo import demo_model_path

    return AutoTokenizer.from_pretrained(demo_model_path())


class CharacterBPE:
    """A CLIP-style BPE tokenizer in miniature: whole words carry `</w>`, other words are read letter by letter."""

    unk_token_id = None

    def __init__(self, words):
        self.vocab = {f"{w}</w>": i for i, w in enumerate(words)}
        self.vocab.update({c: len(self.vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for word in text.lower().split():
            ids += [self.vocab[f"{word}</w>"]] if f"{word}</w>" in self.vocab else [self.vocab[c] for c in word]
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids):
        tokens = {i: t for t, i in self.vocab.items()}
        return [tokens[i] for i in ids]


def test_the_warning_is_exported_beside_weak_edit_warning_and_is_a_user_warning():
    assert "UnknownNameWarning" in hf_clip_forget.__all__ and "WeakEditWarning" in hf_clip_forget.__all__
    assert issubclass(UnknownNameWarning, UserWarning)


def test_a_typo_warns_naming_the_closest_known_word_and_the_right_name_does_not(tokenizer):
    with pytest.warns(UnknownNameWarning, match=r"'dgo'.*did you mean 'dog'\?") as caught:
        add_forget_adapter(tiny_clip(), ["dgo"], tokenizer, templates="single", show_progress=False)
    warning = next(w.message for w in caught if isinstance(w.message, UnknownNameWarning))
    assert (warning.name, warning.kind, warning.suggestions[0]) == ("dgo", "class", "dog")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, templates="single", show_progress=False)


def test_the_warning_can_be_turned_into_an_error_before_the_model_is_touched(tokenizer):
    model = tiny_clip()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownNameWarning)
        with pytest.raises(UnknownNameWarning, match="did you mean 'horse'"):
            add_forget_adapter(model, ["hrose"], tokenizer, templates="single", show_progress=False)
    assert not hasattr(model, "peft_config") or not model.peft_config


def test_retain_class_typos_are_named_too(tokenizer):
    with pytest.warns(UnknownNameWarning, match="'catt'.*did you mean 'cat'"):
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, retain_classes=["catt"], templates="single",
                           show_progress=False)  # fmt: skip


def test_an_unknown_domain_warns_naming_the_built_in_one_and_given_templates_silence_it(tokenizer):
    options = dict(retain_classes=["cat"], retain_domains=["photo"], show_progress=False)
    with pytest.warns(UnknownNameWarning, match=r"Domain 'skech' is not a built-in domain.*did you mean 'sketch'\?"):
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, domains=["skech"], **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, domains=["sketch"], **options)
        add_forget_adapter(tiny_clip(), ["dog"], tokenizer, domains=["doodle"], **options,
                           domain_templates={"doodle": ["a doodle of a {}."]})  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, UnknownNameWarning)]
    (paint,) = unknown_domain_names(["paintng"])
    assert paint.suggestions == ("art_painting",) and paint.kind == "domain"


def test_wordpiece_reads_a_typo_in_pieces_and_suggests_the_whole_word(wordpiece):
    (dgo,) = unknown_class_names(wordpiece, ["dgo"])
    assert dgo.suggestions[0] == "dog" and "'d' + '##go'" in dgo.reason
    (persn,) = unknown_class_names(wordpiece, ["persn"])
    assert persn.suggestions[0] == "person"
    (house,) = unknown_class_names(wordpiece, ["dgo house"])
    assert house.suggestions[0] == "dog house"
    # real class names: whole words, plurals of whole words, and rare words the vocabulary splits with no known word
    # one edit away ("giraffe" is 'gi' + '##raf' + '##fe' here) are accepted
    names = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person", "Leopards", "binocular", "airplane"]
    assert unknown_class_names(wordpiece, names) == []


def test_bpe_vocabularies_count_words_with_their_end_marker():
    bpe = CharacterBPE(["dog", "cat", "horse", "house"])
    assert [w.suggestions[0] for w in unknown_class_names(bpe, ["dgo", "hosre"])] == ["dog", "horse"]
    assert unknown_class_names(bpe, ["dog", "cat"]) == []


def test_the_vocabulary_is_built_once_per_tokenizer_and_names_are_checked_once(wordpiece, monkeypatch):
    unknown_class_names(wordpiece, ["dgo"])
    built = known_words.whole_words(wordpiece)
    calls = []
    original = tokenizer_checks._class_name_problem
    monkeypatch.setattr(tokenizer_checks, "_class_name_problem", lambda *a: calls.append(a) or original(*a))
    start = time.perf_counter()
    for _ in range(20):  # a sweep or calibration adds one adapter per strength
        unknown_class_names(wordpiece, ["dgo", "zebra", "tigre"])
    assert time.perf_counter() - start < 0.5
    assert known_words.whole_words(wordpiece) is built
    assert [a[1] for a in calls] == ["zebra", "tigre"]  # each name once ("dgo" was checked above)


# ----------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--classes", "dgo"], "error: --classes 'dgo' is mostly unknown to the tokenizer"),
        (["--classes", "cat", "--retain-classes", "dog,brid"], "error: --retain-classes 'brid'"),
        (
            ["--classes", "dog", "--domains", "skech", "--retain-domains", "photo"],
            "error: --domains 'skech' is not a built-in domain",
        ),  # fmt: skip
    ],
)
def test_the_command_line_refuses_a_typo_naming_the_flag_and_the_closest_word(model_dir, tmp_path, capsys, extra,
                                                                                expected):  # fmt: skip
    output = tmp_path / "adapter"
    assert main(["forget", model_dir, *extra, "--templates", "single", "--output", str(output)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(expected) and "did you mean" in line and "--allow-unknown-names" in line, line
    assert "`" not in line and not output.exists()


def test_every_unknown_name_is_listed_in_one_error_line(model_dir, tmp_path, capsys):
    args = ["forget", model_dir, "--classes", "dgo", "--retain-classes", "catt", "--output", str(tmp_path / "a")]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "--classes 'dgo'" in line and "--retain-classes 'catt'" in line and "did you mean 'cat'" in line


def test_allow_unknown_names_saves_the_adapter_as_written_without_a_warning(model_dir, tmp_path, capsys):
    output = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownNameWarning)
        args = ["forget", model_dir, "--classes", "dgo", "--templates", "single", "--allow-unknown-names"]
        assert main([*args, "--output", str(output)]) == 0
    assert json.loads((output / "adapter_config.json").read_text())["forgotten_classes"] == ["dgo"]
    assert main(["forget", model_dir, "--classes", "dog", "--output", str(tmp_path / "right")]) == 0
