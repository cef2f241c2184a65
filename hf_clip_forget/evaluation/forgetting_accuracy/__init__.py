"""The ``forgetting_accuracy`` `evaluate` metric script (load it with
:func:`hf_clip_forget.evaluation.load_forgetting_metric`, or ``evaluate.load`` on this directory).

This file only makes the directory a package, so that the script is installed with ``hf_clip_forget``."""
