"""Does a tokenizer belong to the model's text tower? An edit computed through the wrong tokenizer removes an
unrelated direction (measured: cosine 0.08 with the right one) while its config names the right class, so what can
be detected is refused, and what can only be suspected (a class name the vocabulary does not know) is warned about.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import string
import unicodedata
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..families import family_of
from .text_embeddings import check_tokenizer_fits, encode_prompts


#: The prompt embedded through both the given tokenizer and the checkpoint's own one.
PROBE_PROMPT = "a photo of a dog."
#: Largest cosine distance between the two probe embeddings that still counts as the same tokenization.
PROBE_TOLERANCE = 1e-5
#: A class name of which at least this fraction of tokens is unknown to the vocabulary is warned about.
UNKNOWN_TOKEN_SHARE = 0.5


def check_tokenizer_matches_model(model, tokenizer, explicit: bool = True) -> None:
    """Raise a ``ValueError`` when ``tokenizer`` cannot be the model's: ids beyond the embedding matrix, a missing
    end-of-text id the model pools at, or (``explicit``: the user passed it) a probe prompt that embeds differently
    than through the tokenizer saved with the model's checkpoint, when that one is available locally."""
    check_tokenizer_fits(model, tokenizer)
    _check_pooling_token(model, tokenizer)
    if explicit:
        _check_against_checkpoint_tokenizer(model, tokenizer)


def _check_pooling_token(model, tokenizer) -> None:
    family = family_of(model)
    if not family.text_pooled_at_eos_token:
        return
    eos = getattr(getattr(model.config, "text_config", None), "eos_token_id", None)
    if eos is None or (eos == 2 and family.legacy_eos_id_reads_largest_id):
        return
    ids = tokenizer(PROBE_PROMPT)["input_ids"]
    if eos not in ids:
        raise ValueError(
            f"The tokenizer does not end prompts with the token id {eos} at which the model reads its text "
            f"embedding (it produced {ids}): it belongs to another model. Load the tokenizer saved with this "
            "checkpoint, e.g. `AutoTokenizer.from_pretrained(<same model id>)`."
        )
    bos = getattr(model.config.text_config, "bos_token_id", None)
    if bos is not None and ids and ids[0] != bos:
        raise ValueError(
            f"The tokenizer starts prompts with token id {ids[0]}, but the model's start-of-text token is {bos}: it "
            "belongs to another model. Load the tokenizer saved with this checkpoint."
        )


def _check_against_checkpoint_tokenizer(model, tokenizer) -> None:
    """Compare ``tokenizer`` with the one saved with the model's checkpoint: nothing to compare when ``tokenizer`` was
    loaded from that checkpoint itself; equal token ids for the probe mean equal embeddings (the same model reads
    them); only different ids need the probe embedded through both."""
    source = getattr(model, "name_or_path", None)
    if source and getattr(tokenizer, "name_or_path", None) == source:
        return
    own = _checkpoint_tokenizer(model)
    if own is None or _same_probe_ids(tokenizer, own):
        return
    with torch.no_grad():
        given = encode_prompts(model, tokenizer, [PROBE_PROMPT], show_progress=False)
        expected = encode_prompts(model, own, [PROBE_PROMPT], show_progress=False)
    distance = 1 - torch.nn.functional.cosine_similarity(given.double(), expected.double()).item()
    if distance > PROBE_TOLERANCE:
        raise ValueError(
            f"The tokenizer passed does not tokenize like the one saved with {model.name_or_path!r}: the prompt "
            f"{PROBE_PROMPT!r} embeds differently (cosine distance {distance:.3g}), so the edit would remove the "
            "wrong directions. Pass the checkpoint's own tokenizer (or none: it is loaded from the checkpoint)."
        )


def _same_probe_ids(tokenizer, own) -> bool:
    try:
        given, expected = tokenizer(PROBE_PROMPT), own(PROBE_PROMPT)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be called this way is compared by its embeddings
        return False
    return all(list(given.get(key, [])) == list(expected.get(key, [])) for key in ("input_ids", "attention_mask"))


#: Checkpoint tokenizers loaded in this process, by source and the state of its tokenizer files: loading one takes
#: longer than a warm edit (issue 13), and a repeated edit must not pay it again.
_CHECKPOINT_TOKENIZERS: dict[tuple, object] = {}


def _tokenizer_files_state(source: str) -> tuple:
    """``(name, size, mtime)`` of the tokenizer files of a local checkpoint directory (empty for a Hub id), so that a
    tokenizer saved again at the same path is loaded again."""
    if not os.path.isdir(source):
        return ()
    names = sorted(n for n in os.listdir(source) if n.startswith(("tokenizer", "vocab", "merges", "special_tokens")))
    return tuple((n, os.stat(os.path.join(source, n)).st_size, os.stat(os.path.join(source, n)).st_mtime_ns)
                 for n in names)  # fmt: skip


def _checkpoint_tokenizer(model):
    """The tokenizer saved with the model's checkpoint if it can be loaded without a download, else ``None``."""
    source = getattr(model, "name_or_path", None)
    if not source:
        return None
    key = (source, _tokenizer_files_state(source))
    if key not in _CHECKPOINT_TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _CHECKPOINT_TOKENIZERS[key] = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:  # noqa: BLE001 - no local tokenizer: nothing to compare with
            _CHECKPOINT_TOKENIZERS[key] = None
    return _CHECKPOINT_TOKENIZERS[key]


class UnknownNameWarning(UserWarning):
    """A class or domain name that is most likely a typo (:func:`unknown_class_names`, :func:`unknown_domain_names`).
    Filter it for names you mean, or turn it into an error. ``name``, ``kind`` (``"class"`` or ``"domain"``),
    ``reason`` (why, without the name) and ``suggestions`` (closest known names, best first) let a caller word its own
    message (the command line names its flags)."""

    def __init__(self, message: str, name: str = "", kind: str = "class", reason: str = "", suggestions=()):
        super().__init__(message)
        self.name, self.kind, self.reason, self.suggestions = name, kind, reason, tuple(suggestions)


def did_you_mean(suggestions: Sequence[str]) -> str:
    """``"did you mean 'dog'?"`` (or ``'a', 'b' or 'c'``), or ``""`` without suggestions."""
    quoted = [repr(s) for s in suggestions]
    return f"did you mean {' or '.join(filter(None, [', '.join(quoted[:-1]), quoted[-1]]))}?" if quoted else ""


def unknown_class_names(tokenizer, classes: Sequence[str]) -> list[UnknownNameWarning]:
    """An :class:`UnknownNameWarning` for each of ``classes`` that is mostly unknown tokens, or has a word the
    tokenizer does not know whole (nor as a plural/singular of a whole word) while a word it knows is one edit
    (a typo) away. A rare word split into pieces with no known word that close (``giraffe`` for a 30k WordPiece
    vocabulary) is accepted: that is how the tokenizer reads real words it lacks."""
    found, checked = [], _vocabulary(tokenizer).checked
    for name in classes:
        if name not in checked:
            checked[name] = _class_name_problem(tokenizer, name)
        problem = checked[name]
        if problem is not None:
            reason, suggestions = problem
            hint = did_you_mean(suggestions) or "it is far from every word the tokenizer knows."
            found.append(
                UnknownNameWarning(
                    f"Class {name!r} {reason}, so its embedding says little about it and the edit may remove something "
                    f"else: {hint} Use a name in the model's vocabulary (or filter "
                    "hf_clip_forget.UnknownNameWarning to keep this one).",
                    *(name, "class", reason, suggestions),
                )
            )
    return found


def unknown_domain_names(domains: Sequence[str], domain_templates=None) -> list[UnknownNameWarning]:
    """An :class:`UnknownNameWarning` for each of ``domains`` with no built-in templates (``DOMAIN_TEMPLATES``) and
    no entry in ``domain_templates``: its prompts would be the generic ``"a <domain> of a {}."``."""
    from .templates import DOMAIN_TEMPLATES, generic_domain_templates

    if domains is None or isinstance(domains, str):  # none, or a bare string (refused later with its own message)
        return []
    known = sorted({*DOMAIN_TEMPLATES, *(domain_templates or {})})
    found = []
    for domain in dict.fromkeys(d for d in domains if isinstance(d, str) and d.strip() and d not in known):
        suggestions = tuple(difflib.get_close_matches(domain.lower(), known, n=3, cutoff=0.6))
        try:
            generic = repr(generic_domain_templates(domain)[0])
        except ValueError:
            continue  # refused later, with its own message
        reason = f"is not a built-in domain ({', '.join(known)}), so its prompts would be the generic {generic}"
        fix = f"describe it with `domain_templates={{{domain!r}: [...]}}` (format strings with one '{{}}')."
        found.append(
            UnknownNameWarning(
                f"Domain {domain!r} {reason}: " + (f"{did_you_mean(suggestions)} Or {fix}" if suggestions else fix),
                *(domain, "domain", reason, suggestions),
            )
        )
    return found


def warn_about_unknown_domains(domains: Sequence[str], domain_templates=None) -> None:
    """Warn (:class:`UnknownNameWarning`) about each domain of :func:`unknown_domain_names`."""
    for warning in unknown_domain_names(domains, domain_templates):
        warnings.warn(warning, stacklevel=4)


def warn_about_poorly_tokenized_classes(tokenizer, classes: Sequence[str], templates: Sequence[str]) -> None:
    """Warn, naming the class, when a class name is likely unknown to the model (:func:`unknown_class_names`: an
    :class:`UnknownNameWarning` naming the closest known words) or its prompts get truncated."""
    flagged = unknown_class_names(tokenizer, classes)
    for warning in flagged:
        warnings.warn(warning, stacklevel=3)
    limit = _usable_length(tokenizer)
    longest = max(templates, key=len) if templates else "{}"
    typos = {warning.name for warning in flagged}
    for name in classes:
        unknown = _unknown_tokens(tokenizer, name)
        if unknown and name not in typos:  # mostly unknown tokens, though its words are whole words of the vocabulary
            warnings.warn(
                f"Class {name!r} is mostly unknown to the tokenizer ({unknown[0]} of {unknown[1]} tokens are the "
                "unknown token) although its vocabulary holds its words, so its embedding says little about it and "
                "the edit may remove something else. Check that the tokenizer is the one saved with the model.",
                stacklevel=3,
            )
        if limit is not None and len(tokenizer(longest.format(name))["input_ids"]) > limit:
            warnings.warn(
                f"Prompts for class {name!r} are longer than the text tower's {limit} tokens and are truncated, so "
                "part of the name is not embedded. Use a shorter name.",
                stacklevel=3,
            )


# ------------------------------------------------------------------------------------- words the tokenizer knows
def _class_name_problem(tokenizer, name: str) -> tuple[str, tuple[str, ...]] | None:
    """``(reason, suggested names)`` for the first word of ``name`` that looks unknown, else ``None``."""
    unknown = _unknown_tokens(tokenizer, name)
    if unknown:
        vocabulary = _vocabulary(tokenizer).words
        word = next((w for w in _words(name) if not _known_whole(tokenizer, w) and w.lower() not in vocabulary), None)
        if word is None:
            return None  # every word is a whole word of the vocabulary: not a typo (see the caller's other warning)
        reason = f"is mostly unknown to the tokenizer ({unknown[0]} of {unknown[1]} tokens are the unknown token)"
        return reason, _replaced(name, word, _closest_words(tokenizer, word))
    for word in _words(name):
        if _checkable(word) and not _known_word(tokenizer, word) and _one_edit_from_known(tokenizer, word):
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"])
            reason = (
                f"has a word the tokenizer does not know whole ({word!r}, read as {' + '.join(map(repr, pieces))})"
            )
            return reason, _replaced(name, word, _closest_words(tokenizer, word))
    return None


def _unknown_tokens(tokenizer, name: str) -> tuple[int, int] | None:
    """``(unknown tokens, tokens)`` of ``name`` when at least :data:`UNKNOWN_TOKEN_SHARE` of them are unknown."""
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    if unknown_id is None or not ids or ids.count(unknown_id) / len(ids) < UNKNOWN_TOKEN_SHARE:
        return None
    return ids.count(unknown_id), len(ids)


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[\s_\-/,.]+", name) if word]


def _checkable(word: str) -> bool:
    """Alphabetic, of a cased or ASCII script (Chinese, without spaces between words, is read by characters)."""
    return word.isalpha() and all(ch.isascii() or unicodedata.category(ch) in ("Ll", "Lu") for ch in word)


def _known_whole(tokenizer, word: str) -> bool:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def _known_word(tokenizer, word: str) -> bool:
    """Whether the tokenizer knows ``word`` whole, in lower case, or as the plural/singular of a whole word."""
    lower = word.lower()
    forms = {word, lower, lower + "s", lower.removesuffix("s"), lower.removesuffix("es")}
    return any(_known_whole(tokenizer, form) for form in forms if form)


def _one_edit_from_known(tokenizer, word: str) -> bool:
    """Whether a whole word of the vocabulary is one deletion, transposition, substitution or insertion away."""
    vocabulary = _vocabulary(tokenizer).words
    word = word.lower()
    letters = set(string.ascii_lowercase) | set(word)
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    edits = (
        [a + b[1:] for a, b in splits if b]
        + [a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1]
        + [a + c + b[1:] for a, b in splits if b for c in letters]
        + [a + c + b for a, b in splits for c in letters]
    )
    return any(edit != word and edit in vocabulary for edit in edits)


def _closest_words(tokenizer, word: str, count: int = 3) -> tuple[str, ...]:
    """The vocabulary's whole words closest to ``word``: ``difflib.get_close_matches`` candidates of similar length
    that share its first or last letter, ranked by edit distance (a swap of two letters counts one), then whether
    they use other letters, then length difference, then vocabulary rank (frequent words first in WordPiece and
    BPE vocabularies)."""
    vocabulary, word = _vocabulary(tokenizer), word.lower()
    pool = [
        w
        for size in range(len(word) - 2, len(word) + 3)
        for w in vocabulary.by_length.get(size, ())
        if w[0] == word[0] or w[-1] == word[-1]  # a typo of both ends is rare; this keeps the search fast
    ]
    candidates = difflib.get_close_matches(word, pool, n=200, cutoff=0.6)
    ranked = sorted(
        candidates,
        key=lambda w: (_edit_distance(word, w), set(w) != set(word), abs(len(w) - len(word)), vocabulary.words[w]),
    )
    return tuple(w for w in ranked if _edit_distance(word, w) <= 2)[:count] or tuple(candidates[:count])


def _replaced(name: str, word: str, replacements: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.replace(word, r) if word != name else r for r in replacements))


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of neighbours cost 1."""
    rows = [list(range(len(b) + 1))] + [[i] + [0] * len(b) for i in range(1, len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


@dataclass(frozen=True)
class _Vocabulary:
    """A tokenizer's whole words, lower-cased (word → rank, and by length), and the class names checked so far."""

    size: int
    words: dict[str, int]
    by_length: dict[int, tuple[str, ...]]
    checked: dict = field(default_factory=dict)


#: Whole-word vocabularies by tokenizer (built once per tokenizer object; rebuilt when its size changes).
_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Marker of a whole word per vocabulary kind: WordPiece marks continuations (``##``), CLIP's BPE word ends
#: (``</w>``), byte-level BPE and SentencePiece word starts (``Ġ``, ``▁``); a word-level vocabulary has none.
_MARKERS = (("##", "continuation"), ("</w>", "end"), ("Ġ", "start"), ("▁", "start"))


def _vocabulary(tokenizer) -> _Vocabulary:
    try:
        cached = _VOCABULARIES.get(tokenizer)
    except TypeError:  # not weakly referenceable: built each time
        cached = None
    if cached is not None and cached.size == _size(tokenizer):
        return cached
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    words: dict[str, int] = {}
    marker = _marker(vocab)
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        word = _whole_word(token, marker)
        if word is not None and len(word) > 1 and word.isalpha():
            words.setdefault(word.lower(), rank)
    lengths = {len(word) for word in words}
    by_length = {size: tuple(word for word in words if len(word) == size) for size in lengths}
    result = _Vocabulary(_size(tokenizer), words, by_length)
    with contextlib.suppress(TypeError):
        _VOCABULARIES[tokenizer] = result
    return result


def _size(tokenizer) -> int:
    return len(tokenizer) if hasattr(tokenizer, "__len__") else -1


def _marker(vocab: dict[str, int]) -> tuple[str, str] | None:
    """The whole-word marker most tokens of ``vocab`` carry (at least 1 %), or ``None`` (a word-level vocabulary)."""

    def count(marker: tuple[str, str]) -> int:
        text, kind = marker
        return sum(1 for token in vocab if (token.endswith(text) if kind == "end" else token.startswith(text)))

    best = max(_MARKERS, key=count)
    return best if count(best) > 0.01 * max(len(vocab), 1) else None


def _whole_word(token: str, marker: tuple[str, str] | None) -> str | None:
    text, kind = marker or ("", "none")
    if kind in ("none", "continuation"):
        return None if text and token.startswith(text) else token
    marked = token.endswith(text) if kind == "end" else token.startswith(text)
    return (token[: -len(text)] if kind == "end" else token[len(text) :]) if marked else None


def _usable_length(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


__all__ = [
    "PROBE_PROMPT",
    "UnknownNameWarning",
    "check_tokenizer_matches_model",
    "did_you_mean",
    "unknown_class_names",
    "unknown_domain_names",
    "warn_about_poorly_tokenized_classes",
    "warn_about_unknown_domains",
]
