"""Names close to a class: whole words of the model's own vocabulary nearest to it in the text embedding space.

A forgotten class can come back under another name ("puppy" for "dog"). The search takes whole words from the
tokenizer's vocabulary (or a word list), embeds each with one template through the *unedited* text tower, and keeps
the words nearest to the class by cosine similarity. The audit tries them; ``expand_neighbours`` forgets them too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

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
            "The tokenizer's vocabulary has no whole words to search for neighbour names: pass a word list "
            "(`vocabulary=`) or names to try (`neighbours=`), or turn the search off (`vocabulary_neighbours=0`, "
            "`expand_neighbours=0`)."
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


def nearest_words(
    class_embedding: Tensor,
    words: Sequence[str],
    word_embeddings: Tensor,
    count: int,
    exclude: Iterable[str],
    rival_embeddings: Tensor | None = None,
) -> list[tuple[str, float]]:
    """The ``count`` words whose (normalised) embeddings are nearest to ``class_embedding``, with their cosines,
    leaving out the names in ``exclude`` (case-insensitive) and every word at least as near to one of the
    ``rival_embeddings`` (the other named classes) as to this class: a word shared by several classes ("animal" for
    "dog" and "cat") is not another name of one of them."""
    excluded = {name.strip().lower() for name in exclude}
    similarity = word_embeddings.float() @ class_embedding.float()
    if rival_embeddings is not None and len(rival_embeddings):
        rival = (word_embeddings.float() @ rival_embeddings.float().T).max(dim=1).values
        similarity = torch.where(similarity > rival, similarity, torch.full_like(similarity, float("-inf")))
    ranked = []
    for index in torch.argsort(similarity, descending=True).tolist():
        if similarity[index] == float("-inf"):
            break
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
    exclude: Sequence[str] = (),
) -> dict[str, list[tuple[str, float]]]:
    """For each forgotten class, the ``count`` vocabulary words nearest to it under the unedited text tower, among
    those nearer to it than to any other class in ``forgotten`` and ``named_classes``.

    Args:
        embed: prompts → normalised ``(n, d)`` embeddings of the unedited model.
        forgotten: the forgotten classes.
        named_classes: the other classes of the edit (excluded from the results, as the forgotten ones, and rivals:
            a word nearer to one of them is not a neighbour).
        words: the candidate words.
        count: neighbours per class.
        template: the prompt each word and class is embedded with.
        exclude: further words to leave out (names already tried).
    """
    rivals = list(dict.fromkeys([*forgotten, *named_classes]))
    classes = embed([template.format(name) for name in rivals])
    word_embeddings = embed([template.format(word) for word in words])
    found = {}
    for index, name in enumerate(forgotten):
        others = torch.cat([classes[:index], classes[index + 1 :]])
        found[name] = nearest_words(classes[index], words, word_embeddings, count, [*rivals, *exclude], others)
    return found


__all__ = ["find_neighbours", "nearest_words", "vocabulary_words"]
