"""Does a tokenizer belong to the model's text tower? An edit computed through the wrong tokenizer removes an
unrelated direction (measured: cosine 0.08 with the right one) while its config names the right class, so what can
be detected is refused, and what can only be suspected (a class name the vocabulary does not know) is warned about.
"""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
import warnings
from collections.abc import Sequence

import torch

from ..families import family_of
from .known_words import (
    NameTokens,
    closest_words,
    known_whole,
    name_tokens,
    one_edit_from_known,
    prompt_lengths,
    unknown_counts,
    whole_words,
)
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
    vocabulary) is accepted: that is how the tokenizer reads real words it lacks. Each name is checked once per
    tokenizer (:func:`~.known_words.name_tokens`), the names not checked yet in batched tokenizer calls."""
    return _unknown_class_names(tokenizer, name_tokens(tokenizer), classes)


def _unknown_class_names(tokenizer, record: NameTokens, classes: Sequence[str]) -> list[UnknownNameWarning]:
    problems = _problems(tokenizer, record, classes)
    found = []
    for name in classes:
        problem = problems[name]
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
    :class:`UnknownNameWarning` naming the closest known words) or its prompts get truncated: first every
    :class:`UnknownNameWarning`, then each class's other warnings in order. Linear in the classes; names already
    checked with this tokenizer are not tokenised again (:func:`~.known_words.name_tokens`), and a repeat whose
    names were all found fine with these templates is one set comparison."""
    record = name_tokens(tokenizer)
    limit = _usable_length(tokenizer)
    longest = max(templates, key=len) if templates else "{}"
    clean = record.clean.setdefault((longest, limit), set())
    if clean.issuperset(classes):  # every name was checked with these templates before and deserved no warning
        return
    flagged = _unknown_class_names(tokenizer, record, classes)
    for warning in flagged:
        warnings.warn(warning, stacklevel=3)
    typos = {warning.name for warning in flagged}
    warned = set(typos)
    counts = unknown_counts(tokenizer, record, classes)
    lengths = prompt_lengths(tokenizer, record, [longest.format(name) for name in classes]) if limit else {}
    for name in classes:
        unknown = _mostly_unknown(counts[name])
        if unknown and name not in typos:  # mostly unknown tokens, though its words are whole words of the vocabulary
            warned.add(name)
            warnings.warn(
                f"Class {name!r} is mostly unknown to the tokenizer ({unknown[0]} of {unknown[1]} tokens are the "
                "unknown token) although its vocabulary holds its words, so its embedding says little about it and "
                "the edit may remove something else. Check that the tokenizer is the one saved with the model.",
                stacklevel=3,
            )
        if limit is not None and lengths[longest.format(name)] > limit:
            warned.add(name)
            warnings.warn(
                f"Prompts for class {name!r} are longer than the text tower's {limit} tokens and are truncated, so "
                "part of the name is not embedded. Use a shorter name.",
                stacklevel=3,
            )
    clean.update(name for name in classes if name not in warned)


# ------------------------------------------------------------------------------------- words the tokenizer knows
def _class_name_problem(tokenizer, name: str, record: NameTokens | None = None) -> tuple[str, tuple[str, ...]] | None:
    """``(reason, suggested names)`` for the first word of ``name`` that looks unknown, else ``None``."""
    record = name_tokens(tokenizer) if record is None else record
    unknown = _mostly_unknown(unknown_counts(tokenizer, record, [name])[name])
    if unknown:
        vocabulary = whole_words(tokenizer).words
        whole = known_whole(tokenizer, record, _words(name))
        word = next((w for w in _words(name) if not whole[w] and w.lower() not in vocabulary), None)
        if word is None:
            return None  # every word is a whole word of the vocabulary: not a typo (see the caller's other warning)
        reason = f"is mostly unknown to the tokenizer ({unknown[0]} of {unknown[1]} tokens are the unknown token)"
        return reason, _replaced(name, word, closest_words(tokenizer, word))
    for word in _words(name):
        if _checkable(word) and not _known_word(tokenizer, record, word) and one_edit_from_known(tokenizer, word):
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"])
            reason = (
                f"has a word the tokenizer does not know whole ({word!r}, read as {' + '.join(map(repr, pieces))})"
            )
            return reason, _replaced(name, word, closest_words(tokenizer, word))
    return None


def _problems(tokenizer, record: NameTokens, names: Sequence[str]) -> dict:
    """``name → _class_name_problem`` for ``names`` (and the names checked before): the names not checked yet, and
    every form of their words that :func:`_class_name_problem` may ask about, are tokenised first in two batched
    calls."""
    todo = [name for name in dict.fromkeys(names) if name not in record.problems]
    if todo:
        unknown_counts(tokenizer, record, todo)
        known_whole(tokenizer, record, [form for name in todo for word in _words(name) for form in _asked_forms(word)])
        for name in todo:
            record.problems[name] = _class_name_problem(tokenizer, name, record)
    return record.problems


def _mostly_unknown(counts: tuple[int, int]) -> tuple[int, int] | None:
    """``(unknown tokens, tokens)`` when at least :data:`UNKNOWN_TOKEN_SHARE` of the tokens are unknown."""
    unknown, total = counts
    return counts if total and unknown / total >= UNKNOWN_TOKEN_SHARE else None


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[\s_\-/,.]+", name) if word]


def _checkable(word: str) -> bool:
    """Alphabetic, of a cased or ASCII script (Chinese, without spaces between words, is read by characters)."""
    return word.isalpha() and all(ch.isascii() or unicodedata.category(ch) in ("Ll", "Lu") for ch in word)


def _word_forms(word: str) -> set[str]:
    """``word``, in lower case, and that as a plural or singular."""
    lower = word.lower()
    return {form for form in (word, lower, lower + "s", lower.removesuffix("s"), lower.removesuffix("es")) if form}


def _asked_forms(word: str) -> set[str]:
    """The forms of ``word`` of which :func:`_class_name_problem` may ask whether they are one known token."""
    return _word_forms(word) if _checkable(word) else {word}


def _known_word(tokenizer, record: NameTokens, word: str) -> bool:
    """Whether the tokenizer knows ``word`` whole, in lower case, or as the plural/singular of a whole word."""
    forms = _word_forms(word)
    whole = known_whole(tokenizer, record, forms)
    return any(whole[form] for form in forms)


def _replaced(name: str, word: str, replacements: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.replace(word, r) if word != name else r for r in replacements))


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
