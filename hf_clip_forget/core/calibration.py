"""Choosing an edit's strength for a budget: the pure part of calibration (numbers in, a choice out).

A *budget* bounds two fractions measured on a labelled validation set: the zero-shot accuracy left on the images the
edit must forget (``forget ≤ max_forget``) and the accuracy lost on the images it must keep
(``kept_before − kept_after ≤ max_retain_drop``; 0.01 is one percentage point). Each searched strength (α of a
nullspace edit; λ and μ of CCUP) gives one :class:`Candidate`; :func:`choose_candidate` picks one of them:

1. among the candidates that meet the budget, the one with the **least collateral damage** (smallest retain drop)
   *as far as the validation set can tell*: a candidate whose drop exceeds the least by no more than
   :data:`TIE_Z` = 1.96 standard errors of that difference (paired over the same kept images,
   :func:`drop_difference_se`; a difference not significant at the 5 % level, up to 3 images) ties with it, and among
   the tied ones those with the **lowest forget accuracy**; of these, the one in the **middle of their strength range**
   (ties: the weaker). The validation set cannot tell these apart, and the middle is furthest from where either
   bound starts to fail on unseen images: the weakest sits exactly on the forget bound (the drop differs by single
   images between strengths that forget), the strongest on the retain bound (measured in ``docs/calibration.md``);
2. if none meets it, the one that forgets most (lowest forget accuracy) among those within the retain-drop budget
   (ties: smaller drop, then weaker);
3. if no candidate is within the retain-drop budget either, the one **nearest to the budget**: smallest total excess
   ``max(0, forget − max_forget) + max(0, drop − max_retain_drop)`` (ties: weaker).

Strength order: a nullspace edit is stronger with larger α; CCUP is stronger with a larger ratio λ/μ (more weight on
forgetting than on keeping), so its order is ``log λ − log μ``.

:func:`check_calibration_record` validates the calibration record a saved adapter config carries
(``ProjectionEditConfig.calibration``, written by ``hf_clip_forget.calibration``), which comes from an untrusted file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


#: The config fields a calibration searches, per edit method.
STRENGTH_FIELDS = {"nullspace": ("alpha",), "ccup": ("ccup_lambda", "ccup_mu")}
#: Slack of budget comparisons: accuracies are ratios of counts, a budget of 0.05 must admit 1/20 exactly.
BUDGET_SLACK = 1e-9
#: Retain drops closer than this many standard errors of their paired difference count as equal (two-sided 5 %).
TIE_Z = 1.96
#: Version of the calibration record's layout (:func:`check_calibration_record`).
RECORD_FORMAT = 1
#: What the card and the report say about where a calibrated edit's parts come from.
DATA_ASSISTED = (
    "The edit is data-assisted in its strength, data-free in its directions: the directions it removes come from "
    "the class names alone; a labelled validation set only chose how strongly they are removed."
)
#: The kept groups a retain budget bounds each on its own: all kept images, or for a domain edit the kept classes
#: apart from the forgotten classes in the kept domains.
KEPT_GROUPS = ("kept", "kept classes", "forgotten classes in the kept domains")
#: How each strength field is written.
STRENGTH_SYMBOLS = {"alpha": "α", "ccup_lambda": "λ", "ccup_mu": "μ"}


def format_strength(strength: Mapping[str, float]) -> str:
    """``"α = 0.85"`` or ``"λ = 1000, μ = 31.62"``."""
    return ", ".join(f"{STRENGTH_SYMBOLS.get(name, name)} = {value:.4g}" for name, value in strength.items())


@dataclass(frozen=True)
class CalibrationBudget:
    """What the user accepts, as fractions in [0, 1].

    Attributes:
        max_forget: largest zero-shot accuracy allowed on the forgotten images (global: every image of a forgotten
            class; domain paradigms: the forgotten (domain, class) cells). 0.01 = 1 %.
        max_retain_drop: largest accuracy drop allowed on the kept images (every image of a retain class, and with
            ``paradigm="domain"`` the forgotten classes in the kept domains), pooled. 0.01 = 1 percentage point.
    """

    max_forget: float = 0.01
    max_retain_drop: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_forget", "max_retain_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"Budget `{name}` must be a number in [0, 1] (a fraction: 0.01 = 1 %), got {value!r}."
                )
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(
                    f"Budget `{name}` must be in [0, 1] (a fraction: 0.01 = 1 %, not 1), got {value!r}. Pass e.g. "
                    f"{name}=0.05 for 5 %."
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def of(cls, budget: CalibrationBudget | Mapping[str, float] | None) -> CalibrationBudget:
        """``budget`` as a :class:`CalibrationBudget` (from a mapping with its field names; ``None``: the default)."""
        if budget is None:
            return cls()
        if isinstance(budget, cls):
            return budget
        if isinstance(budget, Mapping):
            unknown = sorted(set(budget) - {"max_forget", "max_retain_drop"})
            if unknown:
                raise ValueError(f"Unknown budget entries {unknown}; a budget has `max_forget` and `max_retain_drop`.")
            return cls(**budget)
        raise TypeError(
            f"`budget` must be a CalibrationBudget or a dict with `max_forget` and `max_retain_drop`, got "
            f"{type(budget).__name__}."
        )

    def to_dict(self) -> dict[str, float]:
        return {"max_forget": self.max_forget, "max_retain_drop": self.max_retain_drop}


@dataclass(frozen=True)
class Candidate:
    """One searched strength and what it did on the validation set.

    Attributes:
        strength: the config fields it sets, e.g. ``{"alpha": 0.8}`` or ``{"ccup_lambda": 1000.0, "ccup_mu": 10.0}``.
        forget_accuracy: accuracy on the forgotten images after the edit.
        kept_accuracy: accuracy on the kept images after the edit.
        retain_drop: kept accuracy before the edit minus after (negative: it improved); with several kept groups
            (a domain edit: the kept classes, and the forgotten classes in the kept domains), the largest drop.
        drop_group: the kept group whose drop ``retain_drop`` is.
        drop_correct: ``(k,)`` bool, which images of ``drop_group`` are classified correctly after the edit (the
            paired noise of a drop difference; ``None``: drops compare exactly). Not saved.
    """

    strength: Mapping[str, float]
    forget_accuracy: float
    kept_accuracy: float
    retain_drop: float
    drop_group: str = "kept"
    drop_correct: Tensor | None = field(default=None, compare=False, repr=False)

    def meets(self, budget: CalibrationBudget) -> bool:
        return self.forget_ok(budget) and self.retain_ok(budget)

    def forget_ok(self, budget: CalibrationBudget) -> bool:
        return self.forget_accuracy <= budget.max_forget + BUDGET_SLACK

    def retain_ok(self, budget: CalibrationBudget) -> bool:
        return self.retain_drop <= budget.max_retain_drop + BUDGET_SLACK

    def excess(self, budget: CalibrationBudget) -> float:
        """How far outside the budget: ``max(0, forget − max_forget) + max(0, drop − max_retain_drop)``."""
        return max(0.0, self.forget_accuracy - budget.max_forget) + max(0.0, self.retain_drop - budget.max_retain_drop)

    @property
    def order(self) -> float:
        return strength_order(self.strength)

    def to_dict(self, budget: CalibrationBudget) -> dict[str, Any]:
        return {
            "strength": dict(self.strength),
            "forget_accuracy": self.forget_accuracy,
            "kept_accuracy": self.kept_accuracy,
            "retain_drop": self.retain_drop,
            "drop_group": self.drop_group,
            "meets_budget": self.meets(budget),
        }


def strength_order(strength: Mapping[str, float]) -> float:
    """How strong an edit is, for ordering: α for a nullspace edit, ``log λ − log μ`` for CCUP."""
    if "alpha" in strength:
        return float(strength["alpha"])
    lam, mu = float(strength["ccup_lambda"]), float(strength["ccup_mu"])
    if lam == 0.0:
        return -math.inf
    return math.inf if mu == 0.0 else math.log(lam) - math.log(mu)


def drop_difference_se(candidate: Candidate, reference: Candidate) -> float:
    """Standard error of ``candidate.retain_drop − reference.retain_drop``, paired over the same kept images:
    ``std(d) / √k`` with ``d_i = reference correct_i − candidate correct_i``. 0 when either has no per-image record or
    they measure different groups (the drops then compare exactly)."""
    a, b = reference.drop_correct, candidate.drop_correct
    if a is None or b is None or candidate.drop_group != reference.drop_group or a.shape != b.shape or not a.numel():
        return 0.0
    differences = a.double() - b.double()
    return float(differences.std(unbiased=False) / math.sqrt(differences.numel()))


#: How :func:`choose_candidate` chose, in words (the report and the card quote it).
CHOICES = {
    "met": "among the strengths that meet the budget, the least retain drop — drops not significantly larger (within "
    "1.96 standard errors, paired over the kept images) count as equal — then the lowest forget accuracy, and of the "
    "strengths still tied the one in the middle of their range (furthest from both bounds)",
    "retain_only": "budget not met: no strength reaches the forget budget within the retain-drop budget; chosen: the "
    "lowest forget accuracy among the strengths within the retain-drop budget",
    "nearest": "budget not met: no strength keeps the retain-drop budget; chosen: the strength nearest to the budget "
    "(smallest total excess over both bounds)",
}


def choose_candidate(candidates: Sequence[Candidate], budget: CalibrationBudget) -> tuple[Candidate, str]:
    """The candidate to write and which rule chose it (a key of :data:`CHOICES`; see the module docstring)."""
    if not candidates:
        raise ValueError("No candidate strengths to choose from.")
    met = [c for c in candidates if c.meets(budget)]
    if met:
        least = min(met, key=lambda c: (c.retain_drop, c.order))
        tied = [
            c for c in met if c.retain_drop - least.retain_drop <= TIE_Z * drop_difference_se(c, least) + BUDGET_SLACK
        ]
        lowest = min(c.forget_accuracy for c in tied)
        return _middle([c for c in tied if c.forget_accuracy <= lowest + BUDGET_SLACK]), "met"
    within = [c for c in candidates if c.retain_ok(budget)]
    if within:
        return min(within, key=lambda c: (c.forget_accuracy, c.retain_drop, c.order)), "retain_only"
    return min(candidates, key=lambda c: (c.excess(budget), c.order)), "nearest"


def _middle(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate nearest the middle of the strength range ``candidates`` span (in :func:`strength_order`: α, or
    ``log λ − log μ``), ties to the weaker: the validation set cannot tell them apart, and the middle is furthest from
    where either bound starts to fail on unseen images."""
    orders = [c.order for c in candidates]
    if not all(math.isfinite(order) for order in orders):
        return min(candidates, key=lambda c: c.order)
    middle = (min(orders) + max(orders)) / 2
    return min(candidates, key=lambda c: (abs(c.order - middle), c.order))


def boundary_midpoints(values: Sequence[float], flags: Sequence[tuple[bool, ...]], geometric: bool) -> list[float]:
    """Midpoints between neighbouring ``values`` (sorted ascending) whose ``flags`` differ: where a budget bound
    switches between met and not met. Arithmetic midpoints, or geometric ones (``geometric``: log-spaced μ)."""
    points = []
    for (low, low_flags), (high, high_flags) in zip(
        zip(values, flags, strict=True), zip(values[1:], flags[1:], strict=True), strict=False
    ):
        if low_flags != high_flags and high > low:
            points.append(math.sqrt(low * high) if geometric and low > 0 else (low + high) / 2)
    return points


# ------------------------------------------------------------------------------------------------- accuracies
def masked_accuracy(correct: Tensor, mask: Tensor) -> float:
    """Accuracy over the images selected by the boolean ``mask`` (``nan`` when it selects none)."""
    count = int(mask.sum())
    return float(correct[mask].double().sum() / count) if count else math.nan


def group_accuracies(correct: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(images, accuracy)`` per group index in ``range(num_groups)``; accuracy ``nan`` for empty groups."""
    counts = torch.bincount(groups, minlength=num_groups).double()
    hits = torch.bincount(groups, weights=correct.double(), minlength=num_groups)
    return counts.long(), torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, math.nan))


# --------------------------------------------------------------------------------------- the saved record
_HEX64 = re.compile(r"[0-9a-f]{64}")
GROUPS = ("forget", "kept", "other")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"`calibration` {message}; the adapter config is corrupt or altered.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_strength(strength: Any, method: str, where: str) -> None:
    fields = STRENGTH_FIELDS.get(method, ())
    _require(isinstance(strength, dict) and set(strength) == set(fields), f"{where} must set exactly {list(fields)}")
    _require(all(_is_number(v) and v >= 0 for v in strength.values()), f"{where} must hold numbers >= 0")


def _check_before_after(value: Any, where: str) -> None:
    _require(isinstance(value, dict) and set(value) == {"before", "after"}, f"{where} must be {{before, after}}")
    _require(all(_is_number(v) and 0 <= v <= 1 for v in value.values()), f"{where} must hold fractions in [0, 1]")


def _check_rows(rows: Any, where: str) -> None:
    _require(isinstance(rows, list), f"`{where}` must be a list")
    for row in rows:
        _require(
            isinstance(row, dict) and set(row) == {"name", "group", "images", "before", "after"},
            f"`{where}` rows must be {{name, group, images, before, after}}",
        )
        _require(isinstance(row["name"], str) and row["group"] in GROUPS, f"`{where}` has a bad name or group")
        _require(isinstance(row["images"], int) and not isinstance(row["images"], bool) and row["images"] >= 1,
                 f"`{where}` image counts must be integers >= 1")  # fmt: skip
        _check_before_after({"before": row["before"], "after": row["after"]}, f"`{where}` accuracies")


_RECORD_KEYS = {
    "format", "adapter", "classes", "retain_classes", "method", "paradigm", "domains", "retain_domains", "budget",
    "budget_met", "choice", "searched", "chosen", "candidates", "forget_accuracy", "kept_accuracy", "per_class",
    "per_cell", "validation", "seconds",
}  # fmt: skip
#: Fields added after format 1 was first written; a record without them is still read.
_OPTIONAL_KEYS = {"classifier"}
_VALIDATION_KEYS = {"num_images", "forget_images", "kept_images", "sha256", "hashed"}


def check_calibration_record(record: Any, method: str | None = None) -> None:
    """Raise a ``ValueError`` unless ``record`` is empty (not calibrated) or a calibration record as
    ``CalibrationReport.to_dict`` writes it: every field present, of its type, fractions in [0, 1], the chosen
    strength one of the candidates and of ``method`` (the config's)."""
    _require(isinstance(record, dict), f"must be a dict, got {type(record).__name__}")
    if not record:
        return
    _require(set(record) - _OPTIONAL_KEYS == _RECORD_KEYS, f"must have exactly the fields {sorted(_RECORD_KEYS)}")
    _require(isinstance(record.get("classifier", ""), str), "`classifier` must be a string")
    _require(record["format"] == RECORD_FORMAT, f"has format {record['format']!r}; this version reads {RECORD_FORMAT}")
    for key in ("adapter", "choice", "method", "paradigm"):
        _require(isinstance(record[key], str), f"`{key}` must be a string")
    for key in ("classes", "retain_classes", "domains", "retain_domains"):
        _require(
            isinstance(record[key], list) and all(isinstance(v, str) for v in record[key]), f"`{key}` must list names"
        )
    _require(record["choice"] in CHOICES, f"`choice` must be one of {sorted(CHOICES)}")
    _require(record["method"] in STRENGTH_FIELDS, f"`method` must be one of {list(STRENGTH_FIELDS)}")
    _require(method is None or record["method"] == method, f"was made for method {record['method']!r}, not {method!r}")
    budget = record["budget"]
    _require(isinstance(budget, dict) and set(budget) == {"max_forget", "max_retain_drop"}, "`budget` is malformed")
    _require(all(_is_number(v) and 0 <= v <= 1 for v in budget.values()), "`budget` must hold fractions in [0, 1]")
    _require(isinstance(record["budget_met"], bool), "`budget_met` must be true or false")
    _require(record["searched"] == list(STRENGTH_FIELDS[record["method"]]), "`searched` does not match `method`")
    _check_strength(record["chosen"], record["method"], "`chosen`")
    candidates = record["candidates"]
    _require(isinstance(candidates, list) and candidates, "`candidates` must be a non-empty list")
    for candidate in candidates:
        _require(isinstance(candidate, dict) and set(candidate) - {"drop_group"} == {"strength", "forget_accuracy",
                 "kept_accuracy", "retain_drop", "meets_budget"}, "`candidates` entries are malformed")  # fmt: skip
        _require(
            candidate.get("drop_group", "kept") in KEPT_GROUPS,
            f"a candidate's `drop_group` must be one of {KEPT_GROUPS}",
        )
        _check_strength(candidate["strength"], record["method"], "a candidate's strength")
        _require(all(_is_number(candidate[k]) and 0 <= candidate[k] <= 1 for k in ("forget_accuracy", "kept_accuracy")),
                 "candidate accuracies must be fractions in [0, 1]")  # fmt: skip
        _require(_is_number(candidate["retain_drop"]) and -1 <= candidate["retain_drop"] <= 1, "bad `retain_drop`")
        _require(isinstance(candidate["meets_budget"], bool), "`meets_budget` must be true or false")
    _require(any(c["strength"] == record["chosen"] for c in candidates), "`chosen` is not among the `candidates`")
    _check_before_after(record["forget_accuracy"], "`forget_accuracy`")
    _check_before_after(record["kept_accuracy"], "`kept_accuracy`")
    _check_rows(record["per_class"], "per_class")
    _check_rows(record["per_cell"], "per_cell")
    validation = record["validation"]
    _require(isinstance(validation, dict) and set(validation) == _VALIDATION_KEYS, "`validation` is malformed")
    for key in ("num_images", "forget_images", "kept_images"):
        value = validation[key]
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"`validation.{key}` must be >= 1"
        )
    _require(isinstance(validation["sha256"], str) and _HEX64.fullmatch(validation["sha256"]) is not None,
             "`validation.sha256` must be 64 lower-case hex digits")  # fmt: skip
    _require(isinstance(validation["hashed"], str), "`validation.hashed` must be a string")
    _require(_is_number(record["seconds"]) and record["seconds"] >= 0, "`seconds` must be a number >= 0")


__all__ = [
    "BUDGET_SLACK",
    "CHOICES",
    "DATA_ASSISTED",
    "GROUPS",
    "KEPT_GROUPS",
    "RECORD_FORMAT",
    "STRENGTH_FIELDS",
    "STRENGTH_SYMBOLS",
    "TIE_Z",
    "CalibrationBudget",
    "Candidate",
    "boundary_midpoints",
    "check_calibration_record",
    "choose_candidate",
    "drop_difference_se",
    "format_strength",
    "group_accuracies",
    "masked_accuracy",
    "strength_order",
]
