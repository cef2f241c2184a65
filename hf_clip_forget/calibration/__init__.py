"""Layer 4 — calibration: choose a forget edit's strength on a labelled validation set for a stated budget.

::

    from hf_clip_forget.calibration import calibrate_forget_adapter

    model, report = calibrate_forget_adapter(clip, ["dog"], tokenizer, data=validation_set,
                                             budget={"max_forget": 0.05, "max_retain_drop": 0.01})
    print(report)                      # budget met or not, the numbers, per class and per (domain, class) cell
    report.save("calibration.json"); report.plot("calibration.png")
    model.save_pretrained("clip-without-dogs")   # the config and the card record the calibration

The edit stays data-free in its directions (they come from the class names); the data only chooses its strength.
"""

from ..core.calibration import CHOICES, CalibrationBudget, Candidate, choose_candidate
from .data import CalibrationRequest, ValidationData, read_validation_data
from .report import DATA_ASSISTED, BeforeAfter, CalibrationReport, GroupAccuracy, ValidationSet
from .run import CalibrationResult, calibrate_forget_adapter
from .search import CalibrationSearch


__all__ = [
    "CHOICES",
    "DATA_ASSISTED",
    "BeforeAfter",
    "CalibrationBudget",
    "CalibrationReport",
    "CalibrationRequest",
    "CalibrationResult",
    "CalibrationSearch",
    "Candidate",
    "GroupAccuracy",
    "ValidationData",
    "ValidationSet",
    "calibrate_forget_adapter",
    "choose_candidate",
    "read_validation_data",
]
