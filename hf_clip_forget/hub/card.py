"""Model cards of forget adapters and of merged unlearned models: metadata first, prose from a template.

The template is ``model_cards/forget_adapter.md`` (shipped inside the package); it is rendered by
``huggingface_hub.ModelCard.from_template`` with a ``ModelCardData`` holding the metadata.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..api import ForgetPeftModel
from ..core.calibration import DATA_ASSISTED
from ..core.fingerprint import TOWER_SAMPLE, TowerFingerprint
from ..families import family_of
from ..tuners.projection_edit.build import TOWER_KEY, fingerprint_from_record
from .card_calibration import calibration_section
from .card_rows import adapter_row, escape_markdown, method_notes, target_names


if TYPE_CHECKING:  # the audit imports the evaluation layer, which imports this package: only its type is needed
    from ..audit import AuditReport

#: The file name of an audit report saved beside an adapter (and uploaded with it).
AUDIT_FILE = "audit.json"


TEMPLATE_NAME = "forget_adapter.md"
TAGS = ("machine-unlearning", "clip", "hf_clip_forget", "projection-edit", "zero-shot-image-classification")
#: The Hub's license identifier for "not known" (https://huggingface.co/docs/hub/repositories-licenses).
UNKNOWN_LICENSE = "unknown"
_LICENSE_KEYS = ("license", "license_name", "license_link")
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


@dataclass(frozen=True)
class ForgetEvaluation:
    """Before/after zero-shot accuracies of an edit on one labelled dataset (fractions in [0, 1]).

    Rendered as a table in the card and as ``model-index`` results (the *after* values) in its metadata.
    """

    dataset_name: str
    dataset_type: str
    forget_accuracy_before: float
    forget_accuracy_after: float
    retain_accuracy_before: float
    retain_accuracy_after: float
    split: str = "test"

    def eval_results(self, task_name: str = "Zero-shot image classification") -> list[EvalResult]:
        common = dict(
            task_type="zero-shot-image-classification",
            task_name=task_name,
            dataset_type=self.dataset_type,
            dataset_name=self.dataset_name,
            dataset_split=self.split,
            metric_type="accuracy",
        )
        return [
            EvalResult(metric_name="forget accuracy", metric_value=self.forget_accuracy_after, **common),
            EvalResult(metric_name="retain accuracy", metric_value=self.retain_accuracy_after, **common),
        ]


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it is a Hub repo id (not a local path, not empty), else ``None``."""
    if not name_or_path or os.path.exists(name_or_path) or os.path.isabs(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def base_model_id(model: ForgetPeftModel) -> str | None:
    """The Hub id of the model the adapters were made for, or ``None`` when it was not loaded from the Hub.

    The base model's own ``name_or_path`` decides when it has one: a model loaded from a local directory has no Hub
    id, even if its adapter config records a name that looks like one (such as the directory's last component).
    """
    source = getattr(model.get_base_model(), "name_or_path", None)
    if not source:
        source = next(iter(model.peft_config.values())).base_model_name_or_path
    return hub_model_id(source)


def check_license(license: str) -> str:
    """``license`` if it has the form of a Hub license identifier (``mit``, ``apache-2.0``, ``other``…)."""
    if not isinstance(license, str) or not _LICENSE_ID.fullmatch(license):
        raise ValueError(
            f"Invalid license {license!r}: give a Hub license identifier such as 'mit', 'apache-2.0' or 'other' "
            "(see https://huggingface.co/docs/hub/repositories-licenses). Nothing was written."
        )
    return license


def base_model_license(model: ForgetPeftModel, *, online: bool = False) -> dict[str, str] | None:
    """The ``license`` (with ``license_name`` and ``license_link`` where given) of the card of the model the forget
    adapters were made for: its ``README.md`` in the local directory it was loaded from, or in its Hub repo (from
    the local cache; with ``online=True`` downloaded if not cached). ``None`` when there is no such card, it names
    no license, or it cannot be read."""
    path = _base_card_path(model, online)
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict() if path else {}
    except Exception:  # noqa: BLE001 - an unreadable card means the license is not known
        return None
    if not isinstance(data.get("license"), str) or not _LICENSE_ID.fullmatch(data["license"]):
        return None
    return {key: str(data[key]) for key in _LICENSE_KEYS if data.get(key)}


def _base_card_path(model: ForgetPeftModel, online: bool) -> str | None:
    source = getattr(model.get_base_model(), "name_or_path", None)
    if source and os.path.isdir(source):
        path = os.path.join(source, "README.md")
        return path if os.path.isfile(path) else None
    repo_id = base_model_id(model)
    if repo_id is None:
        return None
    revision = next(iter(model.peft_config.values())).base_model_revision
    cached = try_to_load_from_cache(repo_id, "README.md", revision=revision)
    if isinstance(cached, str) or not online:
        return cached if isinstance(cached, str) else None
    try:
        return hf_hub_download(repo_id, "README.md", revision=revision)
    except Exception:  # noqa: BLE001 - unreachable, gated or no card: the license is not known
        return None


def _card_license(model: ForgetPeftModel, license: str | None, online: bool) -> tuple[dict[str, str], str]:
    """The card's license metadata and the Provenance table's words on where it comes from."""
    if license is not None:
        return {"license": check_license(license)}, f"`{license}` (given by the uploader)"
    found = base_model_license(model, online=online)
    if found:
        return found, f"`{escape_markdown(found['license'])}` (the base model's)"
    return {"license": UNKNOWN_LICENSE}, "unknown: the base model's license could not be determined"


def fingerprint_row(key: str, data: dict) -> dict:
    """What one ``base_fingerprints`` entry covers, for the Provenance table."""
    fingerprint = fingerprint_from_record(key, data)
    if isinstance(fingerprint, TowerFingerprint):
        return {
            "module": key.removeprefix(TOWER_KEY),
            "covers": f"all {fingerprint.tensors} tensors (names and shapes exactly; {TOWER_SAMPLE} fixed entries "
            f"of each, as a sketch)",
            "sha256": fingerprint.structure,
        }
    shape = "×".join(map(str, fingerprint.shape))
    return {"module": key, "covers": f"the weight ({shape}) in full", "sha256": fingerprint.sha256}


def build_model_card(
    model: ForgetPeftModel,
    repo_id: str | None = None,
    *,
    merged: bool = False,
    evaluations: Sequence[ForgetEvaluation] = (),
    license: str | None = None,
    online: bool = False,
    with_preprocessors: bool = False,
    audit: AuditReport | None = None,
) -> ModelCard:
    """The card of ``model``'s forget adapters (or, with ``merged=True``, of the merged full model).

    Its ``license`` is ``license`` if given (a Hub license identifier), else the base model's
    (:func:`base_model_license`; looked up on the Hub only with ``online=True``), else ``unknown``.
    ``with_preprocessors``: the merged checkpoint comes with its tokenizer and image processor, so the card shows
    ``pipeline`` usage; otherwise it says to take them from the base model. ``audit``: an
    :class:`~hf_clip_forget.audit.AuditReport` of this model's adapters, shown in an "Audit" section.
    """
    configs = dict(model.peft_config)
    check_audit_matches(model, audit)
    first = next(iter(configs.values()))
    base_model = base_model_id(model)
    license_metadata, license_cell = _card_license(model, license, online)
    active = set(model.active_adapters)
    forgotten = list(dict.fromkeys(c for config in configs.values() for c in config.forgotten_classes))
    evaluations = list(evaluations)

    title = repo_id.split("/")[-1] if repo_id else ("Unlearned model" if merged else "Forget adapter")
    eval_results = [result for e in evaluations for result in e.eval_results()] or None
    card_data = ModelCardData(
        library_name="transformers" if merged else "peft",
        base_model=base_model,
        pipeline_tag="zero-shot-image-classification",
        tags=list(TAGS) + ([] if merged else ["peft"]),
        **license_metadata,
        eval_results=eval_results,
        model_name=title if eval_results else None,  # only meaningful inside model-index
        forgotten_classes=forgotten,
        unlearning_method=sorted({config.method for config in configs.values()}),
    )
    adapters = [adapter_row(name, config, name in active, audit) for name, config in configs.items()]
    fingerprints = [fingerprint_row(key, data) for key, data in first.base_fingerprints.items()]
    edited_modules = sorted({m for config in configs.values() for m in target_names(config)})
    versions = first.provenance.get("versions", {})
    template = resources.files("hf_clip_forget").joinpath("model_cards", TEMPLATE_NAME).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=escape_markdown(title),
        merged=merged,
        repo_id=repo_id or "<this repo>",
        base_model=base_model,
        base_revision=first.base_model_revision,
        base_link=f"[`{base_model}`](https://huggingface.co/{base_model})"
        if base_model
        else "a CLIP-style dual encoder",
        base_model_cell=f"`{base_model}`" if base_model else "not a Hub model (see the fingerprints)",
        base_revision_cell=f"`{first.base_model_revision}`" if first.base_model_revision else "unknown",
        model_class=type(model.get_base_model()).__name__,  # a Python identifier: safe inside code blocks
        needs_package=_has_package_towers(model.get_base_model()),
        with_preprocessors=with_preprocessors,
        license_cell=license_cell,
        adapters=adapters,
        neighbours=any(getattr(config, "neighbour_names", None) for config in configs.values()),
        method_notes=method_notes(configs.values()),
        evaluations=[_evaluation_row(e) for e in evaluations],
        edited_modules="`, `".join(edited_modules),
        mergeable=all(getattr(config, "mergeable", True) for config in configs.values()),
        scope=family_of(model.get_base_model()).scope,
        audit=_audit_section(audit) if audit is not None else None,  # the library's own text (Markdown intended)
        calibrations=[calibration_section(name, c) for name, c in configs.items() if getattr(c, "calibration", {})],
        data_assisted=DATA_ASSISTED,
        fingerprints=fingerprints,
        unverified=[name for name, config in configs.items() if getattr(config, "trust_unverified", False)],
        created=escape_markdown(first.provenance.get("created", "unknown")),
        versions=", ".join(f"{escape_markdown(k)} {escape_markdown(v)}" for k, v in versions.items()) or "unknown",
    )


def _holds_preprocessors(directory: str) -> bool:
    present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    return "tokenizer_config.json" in present and bool(present & {"preprocessor_config.json", "processor_config.json"})


def _has_package_towers(base) -> bool:
    """Whether ``base`` holds towers defined by ``hf_clip_forget.models`` (the demo model's), which transformers
    can load only after ``import hf_clip_forget`` has registered them."""
    return any(type(module).__module__.startswith("hf_clip_forget.models") for module in base.modules())


def _evaluation_row(evaluation: ForgetEvaluation) -> dict:
    def percent(value: float) -> str:
        return f"{100 * value:.1f} %"

    return {
        "dataset_name": escape_markdown(evaluation.dataset_name),
        "split": escape_markdown(evaluation.split),
        "forget_before": percent(evaluation.forget_accuracy_before),
        "forget_after": percent(evaluation.forget_accuracy_after),
        "retain_before": percent(evaluation.retain_accuracy_before),
        "retain_after": percent(evaluation.retain_accuracy_after),
    }


def write_model_card(
    model: ForgetPeftModel,
    directory: str,
    merged: bool = False,
    repo_id: str | None = None,
    evaluations: Sequence[ForgetEvaluation] = (),
    license: str | None = None,
    online: bool = False,
    audit: AuditReport | None = None,
) -> None:
    """Write :func:`build_model_card` as ``README.md`` into ``directory`` (a merged card shows ``pipeline`` usage
    when the directory holds the tokenizer and the image processor); with ``audit``, also the report as
    ``audit.json``."""
    card = build_model_card(
        model,
        repo_id,
        merged=merged,
        evaluations=evaluations,
        license=license,
        online=online,
        with_preprocessors=_holds_preprocessors(directory),
        audit=audit,
    )
    card.save(os.path.join(directory, "README.md"))
    if audit is not None:
        audit.save(os.path.join(directory, AUDIT_FILE))


def check_audit_matches(model: ForgetPeftModel, audit: AuditReport | None) -> None:
    """Refuse an audit of other adapters or classes than ``model`` holds (a card must not show another model's)."""
    if audit is None:
        return
    missing = [name for name in audit.adapters if name not in model.peft_config]
    forgotten = {c for config in model.peft_config.values() for c in config.forgotten_classes}
    foreign = [c for c in audit.forgotten_classes if c not in forgotten]
    if missing or foreign:
        raise ValueError(
            f"The audit is of adapters {list(audit.adapters)} forgetting {list(audit.forgotten_classes)}, but this "
            f"model holds {list(model.peft_config)} forgetting {sorted(forgotten)}. Audit this model "
            "(`model.audit_forgetting(...)`) and pass that report."
        )


def _audit_section(audit: AuditReport) -> dict:
    def number(value) -> str:
        return "—" if value is None else f"{value:.3g}"

    rows = [
        {
            "probe": escape_markdown(row.probe),
            "forgotten_class": escape_markdown(row.forgotten_class),
            "subject": escape_markdown(row.subject),
            "metric": escape_markdown(row.metric if row.verdict != "skipped" else f"skipped: {row.note}"),
            "before": number(row.before),
            "after": number(row.after),
            "chance": number(row.chance),
            "verdict": escape_markdown(row.verdict),
        }
        for row in audit.rows
    ]
    counts = ", ".join(f"{count} {name}" for name, count in audit.counts().items() if count)
    return {
        "source": escape_markdown(audit.data or "data-free: text proxies only"),
        "counts": escape_markdown(counts),
        "rows": rows,
        "seconds": f"{audit.seconds:.0f}",
    }
