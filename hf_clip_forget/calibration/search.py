"""The strengths a calibration tries: a grid, refined around the budget's boundary, each tried on the real adapter.

The factors of a forget adapter (its directions) do not depend on its strength — α of a nullspace edit, λ and μ of
CCUP are applied when the layer composes its edit — so a calibration builds the adapter once and only changes its
strength between candidates (:func:`set_strength`: the config and every layer's settings, exactly what
``add_forget_adapter(..., alpha=...)`` would have set). What is measured is therefore the adapter that is written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from peft import PeftModel
from tqdm.auto import tqdm

from ..core.calibration import STRENGTH_FIELDS, CalibrationBudget, Candidate, boundary_midpoints, strength_order
from ..tuners.projection_edit.config import MAX_CCUP_WEIGHT


def _default_alphas() -> tuple[float, ...]:
    return tuple(round(0.05 * step, 2) for step in range(1, 21))  # 0.05, 0.10, …, 1.0


def _default_mus() -> tuple[float, ...]:
    return tuple(float(f"{10 ** (exponent / 2):.4g}") for exponent in range(-4, 13))  # 0.01, 0.0316, …, 1e6


@dataclass(frozen=True)
class CalibrationSearch:
    """The grid a calibration searches, then refines around where the budget switches between met and not met.

    Attributes:
        alphas: nullspace strengths α, in (0, 1] (default 0.05, 0.10, …, 1.0).
        mus: CCUP retain weights μ, in (0, 1e8] (default log-spaced, two per decade, 0.01 … 1e6).
        lambdas: CCUP forget weights λ, in (0, 1e8]; ``None``: only the adapter's ``ccup_lambda`` (default 1000).
            With several, every (λ, μ) pair is tried.
        refine: rounds of refinement: each adds the midpoint (geometric for μ) between every two neighbouring
            strengths where the forget or the retain-drop bound switches between met and not met.
    """

    alphas: tuple[float, ...] = dataclasses.field(default_factory=_default_alphas)
    mus: tuple[float, ...] = dataclasses.field(default_factory=_default_mus)
    lambdas: tuple[float, ...] | None = None
    refine: int = 3

    def __post_init__(self) -> None:
        limits = {"alphas": (0.0, 1.0), "mus": (0.0, MAX_CCUP_WEIGHT), "lambdas": (0.0, MAX_CCUP_WEIGHT)}
        for name, (low, high) in limits.items():
            values = getattr(self, name)
            if values is None and name == "lambdas":
                continue
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise TypeError(f"`search.{name}` must be a list of numbers, got {values!r}.")
            values = tuple(values)
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v <= high]
            if not values or bad or any(math.isnan(float(v)) for v in values):
                raise ValueError(
                    f"`search.{name}` must be a non-empty list of numbers in ({low:g}, {high:g}], got {values!r}."
                )
            object.__setattr__(self, name, tuple(sorted({float(v) for v in values})))
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"`search.refine` must be an integer >= 0 (rounds of refinement), got {self.refine!r}.")

    @classmethod
    def of(cls, search: CalibrationSearch | Mapping | None) -> CalibrationSearch:
        """``search`` as a :class:`CalibrationSearch` (from a mapping of its fields; ``None``: the default grid)."""
        if search is None:
            return cls()
        if isinstance(search, cls):
            return search
        if isinstance(search, Mapping):
            unknown = sorted(set(search) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"Unknown `search` entries {unknown}; accepted: alphas, mus, lambdas, refine.")
            return cls(**search)
        raise TypeError(f"`search` must be a CalibrationSearch or a dict, got {type(search).__name__}.")

    def grid(self, method: str, ccup_lambda: float) -> list[dict[str, float]]:
        """The first strengths tried for ``method`` (``ccup_lambda``: the adapter's λ when ``lambdas`` is None)."""
        if method == "nullspace":
            return [{"alpha": alpha} for alpha in self.alphas]
        lambdas = self.lambdas if self.lambdas is not None else (float(ccup_lambda),)
        return [{"ccup_lambda": lam, "ccup_mu": mu} for lam in lambdas for mu in self.mus]

    def refinements(self, method: str, candidates: Iterable[Candidate], budget: CalibrationBudget) -> list[dict]:
        """New strengths between tried neighbours whose budget bounds differ (along α, or along μ for each λ)."""

        def flags(candidate: Candidate) -> tuple[bool, bool]:
            return candidate.forget_ok(budget), candidate.retain_ok(budget)

        if method == "nullspace":
            tried = sorted(candidates, key=lambda c: c.strength["alpha"])
            alphas = boundary_midpoints([c.strength["alpha"] for c in tried], [flags(c) for c in tried], False)
            return [{"alpha": alpha} for alpha in alphas]
        points = []
        for lam in sorted({c.strength["ccup_lambda"] for c in candidates}):
            tried = sorted(
                (c for c in candidates if c.strength["ccup_lambda"] == lam), key=lambda c: c.strength["ccup_mu"]
            )
            mus = boundary_midpoints([c.strength["ccup_mu"] for c in tried], [flags(c) for c in tried], True)
            points.extend({"ccup_lambda": lam, "ccup_mu": mu} for mu in mus)
        return points


def search_strengths(
    evaluate: Callable[[dict[str, float]], Candidate],
    method: str,
    search: CalibrationSearch,
    budget: CalibrationBudget,
    ccup_lambda: float,
    show_progress: bool = True,
) -> tuple[Candidate, ...]:
    """Every candidate tried — the grid, then up to ``search.refine`` rounds of refinements — weakest first."""
    tried: dict[tuple, Candidate] = {}
    points = search.grid(method, ccup_lambda)
    progress = tqdm(total=len(points), desc="Calibrating strength", unit="strength", disable=not show_progress)
    with progress:
        for round_ in range(search.refine + 1):
            points = [point for point in points if _key(point) not in tried]
            if not points:
                break
            if round_:
                progress.total += len(points)
                progress.refresh()
            for point in points:
                tried[_key(point)] = evaluate(point)
                progress.update()
            points = search.refinements(method, tried.values(), budget)
    return tuple(sorted(tried.values(), key=lambda c: (strength_order(c.strength), sorted(c.strength.items()))))


def _key(point: Mapping[str, float]) -> tuple:
    return tuple(sorted(point.items()))


def set_strength(model: PeftModel, adapter_name: str, strength: Mapping[str, float], **fields) -> None:
    """Give adapter ``adapter_name`` of ``model`` this strength: a new config (validated as any config, with
    ``fields`` also replaced; a data-free effect estimate recorded for another strength is dropped from its
    provenance) and the same settings in every layer holding it, which recompute their edit at the next forward. Its
    factors are left as they are."""
    config = model.peft_config[adapter_name]
    allowed = STRENGTH_FIELDS[config.method]
    if set(strength) != set(allowed):
        raise ValueError(f"A {config.method} adapter's strength is {list(allowed)}, got {sorted(strength)}.")
    values = {name: float(value) for name, value in strength.items()}
    estimate = config.provenance.get("effect_estimate") if isinstance(config.provenance, dict) else None
    if isinstance(estimate, dict) and estimate.get("strength", values) != values and "provenance" not in fields:
        # a data-free effect estimate made for another strength no longer describes this adapter
        fields["provenance"] = {key: value for key, value in config.provenance.items() if key != "effect_estimate"}
    model.peft_config[adapter_name] = dataclasses.replace(config, **values, **fields)
    for layer in model.base_model.forget_layers().values():
        settings = layer.projection_edit_settings.get(adapter_name)
        if settings is not None:
            layer.projection_edit_settings[adapter_name] = dataclasses.replace(settings, **values)


__all__ = ["CalibrationSearch", "search_strengths", "set_strength"]
