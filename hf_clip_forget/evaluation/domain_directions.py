"""Does a model's text know an image's domain? The AUC of each domain's text direction on image embeddings.

A dual encoder can forget "dog in sketches" only if its sketch prompts differ from its photo prompts where its sketch
images differ from its photo images. For each domain ``d`` of a labelled set, the *text direction*

    ``u_d = mean_c t(d, c) − mean_{d' ≠ d} mean_c t(d', c)``

(``t(d, c)``: the normalised text embedding of class ``c`` under domain ``d``'s templates, averaged over templates)
scores every image by ``v · u_d``; the AUC of that score separating the images of domain ``d`` from the others
says how much the text knows about the domain (0.5: nothing; 1: it separates them perfectly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def binary_auc(scores: Tensor, positive: Tensor) -> float:
    """The area under the ROC curve of ``scores`` for the boolean labels ``positive`` (Mann–Whitney, ties half)."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError("The AUC needs images of both kinds (the domain and the others).")
    greater = (scores[positive][:, None] > scores[~positive][None, :]).double().sum()
    ties = (scores[positive][:, None] == scores[~positive][None, :]).double().sum()
    return float((greater + ties / 2) / (n_pos * n_neg))


def domain_text_directions(text_embeds: Tensor) -> Tensor:
    """``(D, d)`` directions ``u_d`` from ``(D, C, d)`` class embeddings per domain (see the module docstring)."""
    if text_embeds.ndim != 3 or text_embeds.shape[0] < 2:
        raise ValueError(f"Expected (domains >= 2, classes, dim) text embeddings, got {tuple(text_embeds.shape)}.")
    means = F.normalize(text_embeds.double(), dim=-1).mean(dim=1)  # (D, d)
    others = (means.sum(dim=0, keepdim=True) - means) / (means.shape[0] - 1)
    return means - others


def domain_direction_auc(image_embeds: Tensor, image_domains: Tensor, text_embeds: Tensor) -> list[float]:
    """Per domain ``d`` (the first axis of ``text_embeds``, ``(D, C, d)``), the AUC of ``v · u_d`` separating the
    images whose ``image_domains`` is ``d`` from the rest."""
    directions = domain_text_directions(text_embeds)
    scores = F.normalize(image_embeds.double(), dim=-1) @ directions.T
    return [binary_auc(scores[:, d], image_domains == d) for d in range(directions.shape[0])]


def domain_class_embeddings(model, tokenizer, domains: Sequence[str], classes: Sequence[str], **options) -> Tensor:
    """``(D, C, d)`` text embeddings of every (domain, class), each averaged over the domain's built-in templates
    (:data:`hf_clip_forget.core.DOMAIN_TEMPLATES`)."""
    from ..core import DOMAIN_TEMPLATES, class_text_embeddings

    rows = [
        class_text_embeddings(
            model, tokenizer, list(classes), templates=list(DOMAIN_TEMPLATES[domain]), **options
        ).embeddings
        for domain in domains
    ]
    return torch.stack(rows)


__all__ = ["binary_auc", "domain_class_embeddings", "domain_direction_auc", "domain_text_directions"]
