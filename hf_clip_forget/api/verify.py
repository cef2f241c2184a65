"""``verify_forget_adapter``: does each adapter's stored edit equal the edit its recorded classes, templates and
settings give on this base model? A downloaded adapter is untrusted: its card may name "dog" while its factors
remove something else. Verification rebuilds the edit from the config and compares the two operators."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from ..core.subspace import EditSpec, compose_edits
from ..tuners.projection_edit.build import BuildInputs, build_adapter


#: Largest accepted entry-wise difference between the stored and the recomputed edit matrices ``M`` (both
#: computed from float32 factors; text encoding on another machine or library version moves entries by ~1e-6,
#: an edit of other classes by ~0.1 or more).
VERIFY_TOLERANCE = 1e-4


#: Said of an adapter loaded with ``trust_unverified=True`` (its source carried no checksums or fingerprints).
UNVERIFIED_NOTE = "unverified load (trust_unverified: no factor checksums or base fingerprints were checked)"


@dataclass(frozen=True)
class AdapterVerification:
    """The verdict for one adapter: ``status`` is ``"match"``, ``"mismatch"``, ``"invalid"`` (its config describes
    no edit that can be built — it names no class to forget, or settings that contradict each other: ``detail``
    says why) or ``"unverifiable"``."""

    adapter_name: str
    status: str
    max_difference: float | None
    tolerance: float
    detail: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VerificationReport:
    """One :class:`AdapterVerification` per adapter; ``ok`` when every adapter matches."""

    results: tuple[AdapterVerification, ...]

    @property
    def ok(self) -> bool:
        return all(result.status == "match" for result in self.results)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": VERIFY_TOLERANCE, "adapters": [r.to_dict() for r in self.results]}

    def __str__(self) -> str:
        lines = [f"{'adapter':<16} {'verdict':<13} {'max |ΔM|':>10}  detail"]
        for r in self.results:
            difference = "-" if r.max_difference is None else f"{r.max_difference:.2e}"
            lines.append(f"{r.adapter_name:<16} {r.status:<13} {difference:>10}  {r.detail}")
        return "\n".join(lines)


def verify_forget_adapter(
    model: PeftModel,
    *,
    tokenizer=None,
    image_processor=None,
    adapter_names: Sequence[str] | None = None,
    tolerance: float = VERIFY_TOLERANCE,
    batch_size: int = 256,
    show_progress: bool = False,
) -> VerificationReport:
    """Recompute each adapter of ``model`` from its recorded classes, templates and settings on ``model``'s base,
    and compare the edit matrix ``M`` of every wrapped layer with the stored one (entry-wise, ``tolerance``).

    Adapters built from user-given vectors (``embedding_source="text_embeds"``) cannot be recomputed and are
    reported as ``"unverifiable"``. An adapter whose config cannot be rebuilt at all (a tampered one naming no
    ``forgotten_classes``, or ``keep_shared_direction`` without ``retain_classes``…) is a finding, not a crash: it
    is reported as ``"invalid"`` with the reason, and the report is not ``ok``. ``tokenizer`` / ``image_processor``
    default to the base checkpoint's own.
    """
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    unknown = sorted(set(names) - set(model.peft_config))
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(model.peft_config)}.")
    inputs = BuildInputs(
        tokenizer, image_processor, batch_size=batch_size, show_progress=show_progress, estimate_effect=False
    )
    return VerificationReport(tuple(_verify_one(model, name, inputs, tolerance) for name in names))


def _verify_one(model: PeftModel, name: str, inputs: BuildInputs, tolerance: float) -> AdapterVerification:
    config = model.peft_config[name]
    if config.embedding_source != "class_names":
        return AdapterVerification(
            name, "unverifiable", None, tolerance, "built from user-given embeddings, which the adapter does not hold"
        )
    request = dataclasses.replace(
        config, rank_pattern={}, retain_rank_pattern={}, projection_shapes={}, factor_checksums={}, stack=[]
    )
    try:
        rebuilt = build_adapter(model.get_base_model(), request, inputs)
    except ValueError as error:  # the config describes no buildable edit: what the adapter claims is false
        # only the rebuild's own refusals (ValueError) are findings; any other exception is a bug and propagates
        return AdapterVerification(
            name, "invalid", None, tolerance, f"its config describes no edit that can be rebuilt: {_one_line(error)}"
        )
    worst, worst_module = 0.0, None
    for module, layer in model.base_model.forget_layers().items():
        if name not in layer.projection_edit_settings:
            continue
        stored = layer.combined_edit([name]).matrix().double().cpu()
        expected = _rebuilt_matrix(layer, name, rebuilt.factors.get(_short(module, rebuilt.factors)))
        difference = float((stored - expected).abs().max()) if expected is not None else float("inf")
        if difference > worst or worst_module is None:
            worst, worst_module = difference, module
    matches = worst <= tolerance
    detail = (
        f"the stored edit is the one its classes {config.forget_names()} give"
        if matches
        else f"`{worst_module}` differs from the edit of {list(config.forgotten_classes)}: the factors do not "
        "forget what the config and card say"
    )
    if getattr(config, "trust_unverified", False):
        detail = f"{UNVERIFIED_NOTE}; {detail}"
    return AdapterVerification(name, "match" if matches else "mismatch", worst, tolerance, detail)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _short(module: str, factors: dict) -> str:
    return next((key for key in factors if module == key or module.endswith("." + key)), module)


def _rebuilt_matrix(layer, name: str, factors) -> torch.Tensor | None:
    if factors is None:
        return None
    forget, retain = factors
    settings = layer.projection_edit_settings[name]
    spec = EditSpec(
        name=name, method=settings.method, forget=forget.float(), retain=None if retain is None else retain.float(),
        alpha=settings.alpha, ccup_lambda=settings.ccup_lambda, ccup_mu=settings.ccup_mu,
    )  # fmt: skip
    edit = compose_edits([spec], layer.out_features, rtol=settings.rank_tolerance)
    edit = edit.transposed() if layer.image_side else edit
    return edit.to(torch.float32).matrix().double()
