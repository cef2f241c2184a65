"""``expand_neighbours``: forget, with each class, the vocabulary words nearest to it (its other names).

The audit finds that a class forgotten by name can come back under a near-synonym ("puppy" for "dog"), above all
after a text-side edit; adding those words to the forget set closes that path. The words are searched once, on the
unedited text tower, and recorded in the config (``neighbour_names``), so that a saved adapter says exactly what it
forgot and is rebuilt from the same words when verified.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core import encode_prompts, find_neighbours, normalize_rows, vocabulary_words
from ...families import family_of
from .config import ProjectionEditConfig


#: How many whole words of the vocabulary are searched (the first ones by token id: roughly the most frequent).
VOCABULARY_SIZE = 4000


def naming_template(model: nn.Module) -> str:
    """The one prompt a candidate name is embedded with: a photo of it, or for an audio model the sound of it."""
    return "the sound of a {}." if family_of(model).default_templates == "sound" else "a photo of a {}."


def with_neighbour_names(
    model: nn.Module, config: ProjectionEditConfig, tokenizer, batch_size: int, show_progress: bool
) -> ProjectionEditConfig:
    """``config`` with ``neighbour_names`` found (unchanged when no expansion is asked or the names are recorded).
    ``model``'s forget edits must be bypassed by the caller: the search runs on the unedited text tower."""
    if not config.expand_neighbours or config.neighbour_names:
        return config
    words = vocabulary_words(tokenizer, VOCABULARY_SIZE)

    def embed(prompts: list[str]):
        return normalize_rows(encode_prompts(model, tokenizer, prompts, batch_size, show_progress).float())

    named = [*config.forgotten_classes, *config.retain_classes]
    found = find_neighbours(
        embed, config.forgotten_classes, named, words, config.expand_neighbours, naming_template(model)
    )
    return dataclasses.replace(config, neighbour_names={name: [w for w, _ in pairs] for name, pairs in found.items()})


__all__ = ["VOCABULARY_SIZE", "naming_template", "with_neighbour_names"]
