"""The validation set of a calibration: what it holds (read before any image is embedded), its identity (a hash, never
the images), and the request checked against it — which images the edit must forget and which it must keep."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch
from torch import Tensor

from ..core import plan_domain_edit, validate_class_names
from ..core.calibration import KEPT_GROUPS
from ..evaluation import ImageFeatures, check_labelled_images
from ..evaluation.features import _labels_and_domains


@dataclass(frozen=True, eq=False)
class ValidationData:
    """Labels and names of a labelled validation set, read without decoding its images.

    Attributes:
        class_names: the names of its ``ClassLabel`` (every class, with or without images).
        labels: ``(n,)`` class indices.
        domain_names: its domains (``None`` without a domain column).
        domains: ``(n,)`` domain indices, or ``None``.
        sha256: the hash identifying it (:func:`dataset_sha256` or :func:`features_sha256`).
        hashed: what was hashed, in words.
    """

    class_names: tuple[str, ...]
    labels: Tensor
    domain_names: tuple[str, ...] | None
    domains: Tensor | None
    sha256: str
    hashed: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_validation_data(data: datasets.Dataset | ImageFeatures) -> ValidationData:
    """The :class:`ValidationData` of a labelled ``datasets.Dataset`` (image + ``ClassLabel`` + optional ``domain``
    column, checked by :func:`~hf_clip_forget.evaluation.check_labelled_images`) or of cached :class:`ImageFeatures`."""
    if isinstance(data, ImageFeatures):
        if len(data) == 0:
            raise ValueError("The validation features are empty: calibration needs labelled images.")
        return ValidationData(
            data.class_names, data.labels, data.domain_names, data.domains, features_sha256(data),
            "image features, labels and domains",
        )  # fmt: skip
    if not isinstance(data, datasets.Dataset):
        raise TypeError(
            f"`data` must be a labelled `datasets.Dataset` (image + ClassLabel columns) or `ImageFeatures`, got "
            f"{type(data).__name__}. Load one with `hf_clip_forget.evaluation.load_labelled_images(path, split=...)`."
        )
    columns = check_labelled_images(data)
    labels, class_names, domains, domain_names = _labels_and_domains(data, columns)
    digest = dataset_sha256(data, columns.image, labels, class_names, domains, domain_names)
    return ValidationData(class_names, labels, domain_names, domains, digest, "image bytes, labels and domains")


def _names_and_indices(class_names, labels, domains, domain_names) -> bytes:
    names = json.dumps([list(class_names), list(domain_names or [])]).encode()
    indices = labels.to(torch.int64).numpy().tobytes()
    return names + indices + (b"" if domains is None else domains.to(torch.int64).numpy().tobytes())


def dataset_sha256(dataset: datasets.Dataset, image_column: str, labels, class_names, domains, domain_names) -> str:
    """sha256 of every image's encoded bytes (in dataset order, each prefixed by its length), then the class and
    domain names and indices: the same images with the same labels give the same hash, whatever their file names."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns([image_column]).with_format("arrow").iter(batch_size=512):
        for item in batch.column(image_column).to_pylist():
            encoded = item.get("bytes") if isinstance(item, dict) else None
            if encoded is None:  # an image stored as a path (image folders)
                path = item.get("path") if isinstance(item, dict) else None
                if not path or not os.path.isfile(path):
                    raise ValueError(
                        f"An image of the validation data has neither bytes nor a readable file ({path!r})."
                    )
                with open(path, "rb") as handle:
                    encoded = handle.read()
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    digest.update(_names_and_indices(class_names, labels, domains, domain_names))
    return digest.hexdigest()


def features_sha256(features: ImageFeatures) -> str:
    """sha256 of cached image features (float32 bytes), then the class and domain names and indices."""
    digest = hashlib.sha256(features.features.to(torch.float32).contiguous().numpy().tobytes())
    digest.update(_names_and_indices(features.class_names, features.labels, features.domains, features.domain_names))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the checked request
@dataclass(frozen=True)
class CalibrationRequest:
    """What to forget, checked against the validation data: the classes (its class names), the retain classes (its
    other classes unless given), the domains and the paradigm (``"domain"`` when ``domains`` are given, else
    ``"global"``, as in ``add_forget_adapter``)."""

    classes: tuple[str, ...]
    retain_classes: tuple[str, ...]
    domains: tuple[str, ...]
    retain_domains: tuple[str, ...]
    paradigm: str


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6) or difflib.get_close_matches(
        name.lower(), [c.lower() for c in choices], n=3, cutoff=0.6
    )
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _known(names: Sequence[str], choices: Sequence[str], what: str, argument: str) -> None:
    known = set(choices)
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = "".join(f" {name!r}{_suggest(name, choices)}" for name in unknown).strip()
        raise ValueError(
            f"`{argument}` names {what} that the validation data does not have: {hints}. Its {what} are "
            f"{list(choices)}; name them exactly as its labels do."
        )


def check_request(
    classes, retain_classes, domains, retain_domains, paradigm: str | None, data: ValidationData
) -> CalibrationRequest:
    """Check the request against ``data`` and fill the defaults; a ``ValueError`` naming the problem and the fix."""
    classes = validate_class_names(classes)
    _known(classes, data.class_names, "classes", "classes")
    if retain_classes is None:
        forgotten = set(classes)
        retain_classes = [name for name in data.class_names if name not in forgotten]
        if not retain_classes:
            raise ValueError(
                f"The validation data has no class besides the forgotten ones ({classes}), so the collateral damage of "
                "the edit cannot be measured. Calibrate on data that also holds images of the classes to keep."
            )
    else:
        retain_classes = validate_class_names(retain_classes, "retain_classes")
        _known(retain_classes, data.class_names, "classes", "retain_classes")
        both = sorted(set(classes) & set(retain_classes))
        if both:
            raise ValueError(f"{both} are both forgotten and retained; a class must be in only one of the lists.")
    domains, retain_domains = list(domains or []), list(retain_domains or [])
    if (domains or retain_domains) and data.domain_names is None:
        raise ValueError(
            "`domains` / `retain_domains` are given, but the validation data has no domain column, so the forgotten "
            "(domain, class) cells cannot be measured. Give data with a `domain` column (PACS-style), or drop the "
            "domains."
        )
    _known(domains, data.domain_names or (), "domains", "domains")
    _known(retain_domains, data.domain_names or (), "domains", "retain_domains")
    paradigm = paradigm or ("domain" if domains else "global")
    # refuses what the paradigm rules out (a domain paradigm without domains, "domain" without retain_domains)
    plan_domain_edit(classes, domains=domains, retain_domains=retain_domains, retain_classes=retain_classes,
                     paradigm=paradigm)  # fmt: skip
    request = CalibrationRequest(
        tuple(classes), tuple(retain_classes), tuple(domains), tuple(retain_domains), paradigm
    )
    _check_images(request, data)
    return request


def _indices(names: Sequence[str], choices: Sequence[str]) -> Tensor:
    """The position of each of ``names`` among ``choices`` (its first): one pass over each."""
    position: dict[str, int] = {}
    for i, choice in enumerate(choices):
        position.setdefault(choice, i)
    return torch.tensor([position[name] for name in names], dtype=torch.long)


def groups(request: CalibrationRequest, data: ValidationData) -> tuple[Tensor, Tensor]:
    """Boolean masks ``(forget, kept)`` over the images.

    Forget: the images of the forgotten classes (``"global"``), or of the forgotten classes in ``domains`` (the domain
    paradigms). Kept: the images of the retain classes, and with ``paradigm="domain"`` the forgotten classes in
    ``retain_domains`` (what that paradigm keeps). Other images (a forgotten class in a domain named nowhere, or under
    ``"complete"`` outside ``domains``) count in neither, but stay in the per-cell numbers.
    """
    forgotten = torch.isin(data.labels, _indices(request.classes, data.class_names))
    kept = torch.isin(data.labels, _indices(request.retain_classes, data.class_names))
    if request.paradigm == "global" or data.domains is None:
        return forgotten, kept
    in_domains = torch.isin(data.domains, _indices(request.domains, data.domain_names))
    if request.paradigm == "domain":
        kept = kept | (forgotten & torch.isin(data.domains, _indices(request.retain_domains, data.domain_names)))
    return forgotten & in_domains, kept


#: The kept group of a domain edit that holds its forgotten classes in the kept domains.
SAME_CLASS_KEPT = KEPT_GROUPS[2]


def kept_groups(request: CalibrationRequest, data: ValidationData) -> dict[str, Tensor]:
    """The kept images split into the groups the retain budget bounds each on its own: ``{"kept": mask}``, and for
    ``paradigm="domain"`` the retain classes' images (``"kept classes"``) apart from the forgotten classes in the kept
    domains (:data:`SAME_CLASS_KEPT`) — pooled, the few images of the latter would hide their collapse among the many
    of the former (measured in ``docs/calibration.md``). Empty groups are left out."""
    forget, kept = groups(request, data)
    if request.paradigm != "domain" or data.domains is None:
        return {KEPT_GROUPS[0]: kept}
    same_class = kept & torch.isin(data.labels, _indices(request.classes, data.class_names))
    named = {KEPT_GROUPS[1]: kept & ~same_class, SAME_CLASS_KEPT: same_class}
    return {name: mask for name, mask in named.items() if mask.any()}


def _check_images(request: CalibrationRequest, data: ValidationData) -> None:
    domain_wise = request.paradigm != "global" and data.domains is not None
    class_ids = _indices(request.classes, data.class_names).tolist()
    domain_ids = _indices(request.domains, data.domain_names).tolist() if domain_wise else []
    for name, class_id in zip(request.classes, class_ids, strict=True):
        of_class = data.labels == class_id
        if not domain_wise and not of_class.any():
            raise ValueError(
                f"The validation data has no images of the forgotten class {name!r}, so how much of it the edit "
                "removes cannot be measured. Add images of it to the validation data."
            )
        for domain, domain_id in zip(request.domains, domain_ids, strict=True) if domain_wise else ():
            if not (of_class & (data.domains == domain_id)).any():
                raise ValueError(
                    f"The validation data has no images of the forgotten cell {domain}/{name} ({name!r} in {domain!r}), "
                    "so how much of it the edit removes cannot be measured. Add images of that cell."
                )
    if not groups(request, data)[1].any():
        raise ValueError(
            f"The validation data has no images of any retain class ({list(request.retain_classes)}), so the "
            "collateral damage of the edit cannot be measured. Add images of the classes to keep."
        )


__all__ = [
    "SAME_CLASS_KEPT",
    "CalibrationRequest",
    "ValidationData",
    "check_request",
    "dataset_sha256",
    "features_sha256",
    "groups",
    "kept_groups",
    "read_validation_data",
]
