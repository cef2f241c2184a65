"""The ``forgetting_accuracy`` `evaluate` metric, shipped inside the package and loaded offline.

The metric script lives in ``forgetting_accuracy/forgetting_accuracy.py`` next to this module; ``evaluate.load``
copies it into its modules cache and loads it from there, with no network access.
"""

from __future__ import annotations

import os


#: Directory of the metric script (``evaluate.load(FORGETTING_METRIC_PATH)`` loads it).
FORGETTING_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forgetting_accuracy")


def load_forgetting_metric(**kwargs):
    """``evaluate.load`` the ``forgetting_accuracy`` metric: accuracy, forget accuracy and retain accuracy of
    integer ``predictions`` against ``references``, given the ``forget_labels``.

    The metric is kept in memory (``keep_in_memory=True``) unless ``kwargs`` say otherwise; other ``kwargs`` go to
    ``evaluate.load`` (e.g. ``num_process`` / ``process_id`` for distributed computation).

    Example::

        >>> metric = load_forgetting_metric()
        >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], forget_labels=[0])
        {'accuracy': 0.75, 'forget_accuracy': 1.0, 'retain_accuracy': 0.6666666666666666, 'num_forget': 1, 'num_retain': 3}
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(FORGETTING_METRIC_PATH, **kwargs)
