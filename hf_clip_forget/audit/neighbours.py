"""Names close to a forgotten class: given by the user, or found in the model's own vocabulary.

A class can come back under another name ("puppy" for "dog"). The automatic search takes whole words from the
tokenizer's vocabulary (or a word list the user passes), embeds each with one template through the *unedited* text
tower, and keeps the words nearest to the class by cosine similarity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor


#: Whole words only: letters, 3 to 20 of them (subword pieces and punctuation are not names).
_WORD = re.compile(r"^[a-z]{3,20}$")
#: How tokenizers mark a piece that starts a word (sentencepiece, byte-level BPE) or ends one (CLIP's BPE).
_START_MARKS = ("▁", "Ġ")
_END_MARK = "</w>"


def vocabulary_words(tokenizer, limit: int) -> list[str]:
    """Up to ``limit`` whole words of ``tokenizer``'s vocabulary, in token-id order (roughly by frequency for
    WordPiece and BPE vocabularies). Raises ``ValueError`` when the vocabulary has no whole words."""
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    words: dict[str, None] = {}
    for token, _ in sorted(vocabulary.items(), key=lambda item: item[1]):
        word = _whole_word(token)
        if word is not None:
            words.setdefault(word)
            if len(words) >= limit:
                break
    if not words:
        raise ValueError(
            "The tokenizer's vocabulary has no whole words to search for neighbour names. Pass `neighbours=` (names "
            "to try) or `vocabulary=` (a word list), or `vocabulary_neighbours=0` to skip the search."
        )
    return list(words)


def _whole_word(token: str) -> str | None:
    if token.startswith("##") or (token.startswith("<") and token.endswith(">")):
        return None
    if token.endswith(_END_MARK):
        token = token[: -len(_END_MARK)]
    elif token.startswith(_START_MARKS):
        token = token[1:]
    token = token.lower()
    return token if _WORD.match(token) else None


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def check_neighbours(neighbours: Mapping[str, Sequence[str]], named_classes: Sequence[str]) -> None:
    """Refuse neighbour names that are themselves a forgotten or retained class (they would test nothing)."""
    for forgotten, names in neighbours.items():
        clashes = sorted({n for n in names for c in named_classes if _same_name(n, c)})
        if clashes:
            raise ValueError(
                f"Neighbour names {clashes} of {forgotten!r} are classes of the edit themselves (forgotten or kept); "
                "a neighbour must be another name for the class. Remove them from `neighbours`."
            )
        blank = [n for n in names if not isinstance(n, str) or not n.strip()]
        if blank:
            raise ValueError(f"Neighbour names of {forgotten!r} must be non-empty strings, got {blank!r}.")


def nearest_words(
    class_embedding: Tensor,
    words: Sequence[str],
    word_embeddings: Tensor,
    count: int,
    exclude: Iterable[str],
) -> list[tuple[str, float]]:
    """The ``count`` words whose (normalised) embeddings are nearest to ``class_embedding``, with their cosines,
    leaving out the names in ``exclude`` (case-insensitive)."""
    excluded = {name.strip().lower() for name in exclude}
    similarity = word_embeddings.float() @ class_embedding.float()
    ranked = []
    for index in torch.argsort(similarity, descending=True).tolist():
        if words[index] not in excluded:
            ranked.append((words[index], float(similarity[index])))
            if len(ranked) == count:
                break
    return ranked


def find_neighbours(
    embed: Callable[[list[str]], Tensor],
    forgotten: Sequence[str],
    named_classes: Sequence[str],
    words: Sequence[str],
    count: int,
    template: str = "a photo of a {}.",
) -> dict[str, list[tuple[str, float]]]:
    """For each forgotten class, the ``count`` vocabulary words nearest to it under the unedited text tower.

    Args:
        embed: prompts → normalised ``(n, d)`` embeddings of the unedited model.
        forgotten: the forgotten classes.
        named_classes: every class of the edit (excluded from the results, with the forgotten ones).
        words: the candidate words.
        count: neighbours per class.
        template: the prompt each word and class is embedded with.
    """
    classes = embed([template.format(name) for name in forgotten])
    word_embeddings = embed([template.format(word) for word in words])
    return {
        name: nearest_words(classes[index], words, word_embeddings, count, exclude=named_classes)
        for index, name in enumerate(forgotten)
    }


__all__ = ["check_neighbours", "find_neighbours", "nearest_words", "vocabulary_words"]
