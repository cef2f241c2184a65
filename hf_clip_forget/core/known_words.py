"""What a tokenizer makes of class names, for :mod:`.tokenizer_checks`: the whole words it knows, the words of its
vocabulary closest to one it does not (suggested for a name that looks like a typo), and each name's tokens, counted
in batched tokenizer calls and recorded per tokenizer (:class:`NameTokens`), so that a build, which checks every
class name, tokenises a name once per process rather than once per build."""

from __future__ import annotations

import contextlib
import difflib
import string
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from .prompt_cache import tokenizer_key


@dataclass(frozen=True)
class WholeWords:
    """A tokenizer's whole words, lower-cased (word → rank, and by length), for a vocabulary of ``size`` tokens."""

    size: int
    words: dict[str, int]
    by_length: dict[int, tuple[str, ...]]


#: Whole-word vocabularies by tokenizer (built once per tokenizer object; rebuilt when its size changes).
_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Marker of a whole word per vocabulary kind: WordPiece marks continuations (``##``), CLIP's BPE word ends
#: (``</w>``), byte-level BPE and SentencePiece word starts (``Ġ``, ``▁``); a word-level vocabulary has none.
_MARKERS = (("##", "continuation"), ("</w>", "end"), ("Ġ", "start"), ("▁", "start"))


def whole_words(tokenizer) -> WholeWords:
    """The whole alphabetic words (two letters or more) of ``tokenizer``'s vocabulary, each at its first rank; built
    once per tokenizer object while its size stays the same (each call for one that takes no weak reference)."""
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
    result = WholeWords(_size(tokenizer), words, by_length)
    with contextlib.suppress(TypeError):
        _VOCABULARIES[tokenizer] = result
    return result


def one_edit_from_known(tokenizer, word: str) -> bool:
    """Whether a whole word of the vocabulary is one deletion, transposition, substitution or insertion away."""
    vocabulary = whole_words(tokenizer).words
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


def closest_words(tokenizer, word: str, count: int = 3) -> tuple[str, ...]:
    """The vocabulary's whole words closest to ``word``: ``difflib.get_close_matches`` candidates of similar length
    that share its first or last letter, ranked by edit distance (a swap of two letters counts one), then whether
    they use other letters, then length difference, then vocabulary rank (frequent words first in WordPiece and
    BPE vocabularies)."""
    vocabulary, word = whole_words(tokenizer), word.lower()
    pool = [
        w
        for size in range(len(word) - 2, len(word) + 3)
        for w in vocabulary.by_length.get(size, ())
        if w[0] == word[0] or w[-1] == word[-1]  # a typo of both ends is rare; this keeps the search fast
    ]
    candidates = difflib.get_close_matches(word, pool, n=200, cutoff=0.6)
    ranked = sorted(
        candidates,
        key=lambda w: (edit_distance(word, w), set(w) != set(word), abs(len(w) - len(word)), vocabulary.words[w]),
    )
    return tuple(w for w in ranked if edit_distance(word, w) <= 2)[:count] or tuple(candidates[:count])


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of neighbours cost 1."""
    rows = [list(range(len(b) + 1))] + [[i] + [0] * len(b) for i in range(1, len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


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


# ------------------------------------------------------------------------------ what a tokenizer makes of names
@dataclass
class NameTokens:
    """What one tokenizer makes of texts, each found once: ``unknown`` (name → ``(unknown tokens, tokens)``, without
    special tokens; ``(0, 0)`` for a tokenizer without an unknown token), ``whole`` (word → whether it is one known
    token), ``problems`` (name → the verdict :mod:`.tokenizer_checks` reached on it) and ``lengths`` (prompt → its
    tokens, special ones included), ``clean`` ((longest template, token limit) → the names found to deserve no
    warning with it, so that a repeated check of them is one set comparison). ``size``: the tokenizer's size, for a
    tokenizer recorded by object."""

    size: int = -1
    unknown: dict[str, tuple[int, int]] = field(default_factory=dict)
    whole: dict[str, bool] = field(default_factory=dict)
    problems: dict[str, object] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    clean: dict[tuple, set[str]] = field(default_factory=dict)


#: Records by :func:`~.prompt_cache.tokenizer_key`, least recently used first: tokenizers that tokenise alike (one
#: loaded anew for each command) share one, and a tokenizer changed in place (tokens added) gets its own.
_BY_KEY: dict[str, NameTokens] = {}
#: At most this many tokenizers' records are kept.
MAX_TOKENIZERS = 8
#: Records of tokenizers without a key (nothing to serialise), by object while its size stays the same.
_BY_OBJECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def name_tokens(tokenizer) -> NameTokens:
    """The record of ``tokenizer`` (empty the first time; a fresh one each call for a tokenizer with neither a key
    nor a weak reference)."""
    key = tokenizer_key(tokenizer)
    if key is None:
        return _record_of_object(tokenizer)
    record = _BY_KEY.pop(key, None) or NameTokens()
    _BY_KEY[key] = record  # now the most recently used
    while len(_BY_KEY) > MAX_TOKENIZERS:
        del _BY_KEY[next(iter(_BY_KEY))]
    return record


def _record_of_object(tokenizer) -> NameTokens:
    size = _size(tokenizer)
    try:
        record = _BY_OBJECT.get(tokenizer)
    except TypeError:  # not weakly referenceable: nothing is kept
        return NameTokens(size)
    if record is None or record.size != size:
        record = _BY_OBJECT[tokenizer] = NameTokens(size)
    return record


def unknown_counts(tokenizer, record: NameTokens, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``record.unknown``, with the ``names`` not in it yet tokenised (in one batched call) and added."""
    todo = [name for name in dict.fromkeys(names) if name not in record.unknown]
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    if unknown_id is None:  # nothing can be the unknown token: no need to tokenise
        record.unknown.update(dict.fromkeys(todo, (0, 0)))
        return record.unknown
    for name, ids in zip(todo, token_ids(tokenizer, todo, special_tokens=False), strict=True):
        record.unknown[name] = (ids.count(unknown_id), len(ids))
    return record.unknown


def known_whole(tokenizer, record: NameTokens, words: Sequence[str]) -> dict[str, bool]:
    """``record.whole``, with the ``words`` not in it yet tokenised (in one batched call) and added: a word is known
    whole when it is one token and that is not the unknown token."""
    todo = [word for word in dict.fromkeys(words) if word not in record.whole]
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    for word, ids in zip(todo, token_ids(tokenizer, todo, special_tokens=False), strict=True):
        record.whole[word] = len(ids) == 1 and ids[0] != unknown_id
    return record.whole


def prompt_lengths(tokenizer, record: NameTokens, prompts: Sequence[str]) -> dict[str, int]:
    """``record.lengths``, with the ``prompts`` not in it yet tokenised (in one batched call) and added."""
    todo = [prompt for prompt in dict.fromkeys(prompts) if prompt not in record.lengths]
    for prompt, ids in zip(todo, token_ids(tokenizer, todo, special_tokens=True), strict=True):
        record.lengths[prompt] = len(ids)
    return record.lengths


def token_ids(tokenizer, texts: Sequence[str], special_tokens: bool) -> list[list[int]]:
    """The token ids of each of ``texts``, with or without the special tokens (no padding, no truncation): one call
    for all of them (a fast tokenizer encodes a list in Rust, in parallel) when the tokenizer takes a list, else one
    call per text, as ``tokenizer(text)`` would give them."""
    options = {} if special_tokens else {"add_special_tokens": False}
    if not texts:
        return []
    try:
        ids = tokenizer(list(texts), **options)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that takes one text at a time is called once per text
        ids = None
    if isinstance(ids, list) and len(ids) == len(texts) and all(isinstance(row, list) for row in ids):
        return ids
    return [list(tokenizer(text, **options)["input_ids"]) for text in texts]


__all__ = [
    "MAX_TOKENIZERS",
    "NameTokens",
    "WholeWords",
    "closest_words",
    "edit_distance",
    "known_whole",
    "name_tokens",
    "one_edit_from_known",
    "prompt_lengths",
    "token_ids",
    "unknown_counts",
    "whole_words",
]
