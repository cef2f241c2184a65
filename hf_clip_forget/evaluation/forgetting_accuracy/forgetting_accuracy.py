# Copyright 2025 The hf_clip_forget Authors.
# Licensed under the Apache License, Version 2.0.
"""Forgetting accuracy: accuracy over all examples, over the forgotten classes and over the retained ones.

A self-contained `evaluate` metric script (it imports nothing from ``hf_clip_forget``), so that ``evaluate.load``
can copy it into its modules cache and load it offline from its directory or its path.
"""

from __future__ import annotations

import datasets
import evaluate


_DESCRIPTION = """
Accuracy of a classifier whose model was edited to forget some classes. Besides the accuracy over all examples,
it reports the accuracy over the examples whose reference is a forgotten class ("forget accuracy", which an
unlearning method wants low) and over the other examples ("retain accuracy", which it wants unchanged). Every
class, forgotten or not, stays a candidate prediction: forgetting means the classifier no longer recognises the
forgotten classes, not that they were removed from the label set.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    forget_labels (`list` of `int`, optional): the labels of the forgotten classes. Without them (or with an
        empty list) only `accuracy` is meaningful and `forget_accuracy` / `retain_accuracy` are `None`.
    per_label (`bool`, defaults to `False`): also return `per_label_accuracy`, label → accuracy over the examples
        with that reference.

Returns:
    accuracy (`float`): fraction of correct predictions over all examples, in [0, 1].
    forget_accuracy (`float` or `None`): fraction of correct predictions over the examples whose reference is in
        `forget_labels`; `None` when there are none.
    retain_accuracy (`float` or `None`): the same over the other examples; `None` without `forget_labels` or when
        every example belongs to a forgotten class.
    num_forget (`int`), num_retain (`int`): how many examples each of the two accuracies averages.
    per_label_accuracy (`dict` of `int` to `float`): only with `per_label=True`.

Examples:
    >>> metric = evaluate.load("hf_clip_forget/evaluation/forgetting_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], forget_labels=[0])
    {'accuracy': 0.75, 'forget_accuracy': 1.0, 'retain_accuracy': 0.6666666666666666, 'num_forget': 1, 'num_retain': 3}
"""

_CITATION = """
@misc{hf_clip_forget,
  title = {hf_clip_forget: training-free class unlearning for CLIP-style dual encoders as PEFT adapters},
  year = {2025}
}
"""


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgettingAccuracy(evaluate.Metric):
    """Accuracy, forget accuracy and retain accuracy of integer predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references, forget_labels=None, per_label: bool = False) -> dict:
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references: give one of each per example."
            )
        if not references:
            raise ValueError("No examples to score: `predictions` and `references` are empty.")
        forget = {int(label) for label in (forget_labels or [])}
        correct = [int(p) == int(r) for p, r in zip(predictions, references, strict=True)]
        is_forget = [int(r) in forget for r in references]
        result = {
            "accuracy": _mean(correct),
            "forget_accuracy": _mean([c for c, f in zip(correct, is_forget, strict=True) if f]) if forget else None,
            "retain_accuracy": _mean([c for c, f in zip(correct, is_forget, strict=True) if not f])
            if forget
            else None,
            "num_forget": sum(is_forget),
            "num_retain": len(references) - sum(is_forget),
        }
        if per_label:
            by_label: dict[int, list[bool]] = {}
            for c, r in zip(correct, references, strict=True):
                by_label.setdefault(int(r), []).append(c)
            result["per_label_accuracy"] = {label: _mean(by_label[label]) for label in sorted(by_label)}
        return result
