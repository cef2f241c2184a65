"""Does a tokenizer belong to the model's text tower? An edit computed through the wrong tokenizer removes an
unrelated direction (measured: cosine 0.08 with the right one) while its config names the right class, so what can
be detected is refused, and what can only be suspected (a class name the vocabulary does not know) is warned about.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

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


def warn_about_poorly_tokenized_classes(tokenizer, classes: Sequence[str], templates: Sequence[str]) -> None:
    """Warn, naming the class, when a class name is mostly unknown tokens or its prompts get truncated."""
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    limit = _usable_length(tokenizer)
    longest = max(templates, key=len) if templates else "{}"
    for name in classes:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if unknown_id is not None and ids and ids.count(unknown_id) / len(ids) >= UNKNOWN_TOKEN_SHARE:
            warnings.warn(
                f"Class {name!r} is mostly unknown to the tokenizer ({ids.count(unknown_id)} of {len(ids)} tokens "
                "are the unknown token), so its embedding says little about it and the edit may remove something "
                "else. Use a name in the model's vocabulary.",
                stacklevel=3,
            )
        if limit is not None and len(tokenizer(longest.format(name))["input_ids"]) > limit:
            warnings.warn(
                f"Prompts for class {name!r} are longer than the text tower's {limit} tokens and are truncated, so "
                "part of the name is not embedded. Use a shorter name.",
                stacklevel=3,
            )


def _usable_length(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


__all__ = ["PROBE_PROMPT", "check_tokenizer_matches_model", "warn_about_poorly_tokenized_classes"]
