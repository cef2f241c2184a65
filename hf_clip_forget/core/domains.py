"""Which (class, domain) cells a domain-aware edit forgets and which it keeps: the three paradigms.

A *cell* is a class seen in one domain ("sketch of a dog") or in none in particular (``domain=None``: the plain
templates, e.g. the 80 ImageNet prompts). Each cell becomes one text direction (its templates' embeddings
averaged) and, optionally, a few synthesised visual prototypes; the forget cells span the forget subspace and the
retain cells the directions the edit must keep (CCUP's retain term, the shared direction).

- ``"global"``: forget the classes everywhere — their plain cells and their cells in every named domain; keep the
  other classes in the same cells.
- ``"domain"``: forget the classes only in ``domains`` and keep them elsewhere — their plain cells and their cells in
  ``retain_domains`` are retained, as are the other classes in every domain. This is the hard case: a sketch-dog
  direction is strongly correlated with the photo-dog and sketch-elephant ones that must stay.
- ``"complete"``: the stronger erasure in ``domains`` — the same forget cells as ``"domain"``, but the classes' own
  cells in other domains are *not* protected (only the other classes are), so nothing holds the forgotten cells'
  residual in place; the classes in other domains may suffer, which the measurements quantify. (To forget *every*
  class in a domain, pass all classes with ``paradigm="domain"``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .text_embeddings import duplicate_names


PARADIGMS = ("global", "domain", "complete")


@dataclass(frozen=True)
class DomainCell:
    """A class in one domain, or in none in particular (``domain=None``)."""

    class_name: str
    domain: str | None = None

    def __str__(self) -> str:
        return self.class_name if self.domain is None else f"{self.domain}/{self.class_name}"


@dataclass(frozen=True)
class DomainPlan:
    """The forget and retain cells of one edit, and the paradigm that chose them."""

    paradigm: str
    forget: tuple[DomainCell, ...]
    retain: tuple[DomainCell, ...]


def _names(values: Sequence[str] | None, argument: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise TypeError(f"`{argument}` must be a list of names, got {values!r}. Did you mean [{values!r}]?")
    names = list(values)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`{argument}` must contain non-blank strings, got {name!r}.")
    duplicates = duplicate_names(names)
    if duplicates:
        raise ValueError(f"`{argument}` contains duplicates {duplicates}; list each once.")
    return names


def plan_domain_edit(
    classes: Sequence[str],
    *,
    domains: Sequence[str] | None = None,
    retain_domains: Sequence[str] | None = None,
    retain_classes: Sequence[str] | None = None,
    paradigm: str | None = None,
) -> DomainPlan:
    """Choose the forget and retain cells.

    Args:
        classes: classes to forget.
        domains: for ``"domain"``/``"complete"``, the domains to forget them in; for ``"global"``, extra domains whose
            domain-conditioned prompts join the forget subspace.
        retain_domains: domains where the classes must stay recognisable (``"domain"``: required).
        retain_classes: the other classes, kept in every cell.
        paradigm: ``"global"``, ``"domain"`` or ``"complete"``; default ``"domain"`` when ``domains`` are given,
            else ``"global"``.
    """
    domains_ = _names(domains, "domains")
    kept_domains = _names(retain_domains, "retain_domains")
    others = _names(retain_classes, "retain_classes")
    if paradigm is None:
        paradigm = "domain" if domains_ else "global"
    if paradigm not in PARADIGMS:
        raise ValueError(f"`paradigm` must be one of {list(PARADIGMS)}, got {paradigm!r}.")
    overlap = sorted(set(domains_) & set(kept_domains))
    if overlap:
        raise ValueError(f"{overlap} are both forgotten and retained domains; a domain must be in only one list.")
    if paradigm != "global" and not domains_:
        raise ValueError(
            f"paradigm={paradigm!r} forgets classes in chosen domains: pass `domains`, e.g. domains=['sketch'] "
            "(or use paradigm='global' to forget them everywhere)."
        )
    if paradigm == "domain" and not kept_domains:
        raise ValueError(
            "paradigm='domain' keeps the classes in the other domains, so it must know them: pass "
            "`retain_domains`, e.g. retain_domains=['photo', 'art_painting', 'cartoon']."
        )
    every_domain = [*domains_, *kept_domains]

    def cells(names: Sequence[str], cell_domains: Sequence[str | None]) -> list[DomainCell]:
        return [DomainCell(name, domain) for name in names for domain in cell_domains]

    if paradigm == "global":
        forget = cells(classes, [None, *every_domain])
        retain = cells(others, [None, *every_domain])
    else:
        forget = cells(classes, domains_)
        retain = cells(others, [None, *every_domain])
        if paradigm == "domain":
            retain = cells(classes, [None, *kept_domains]) + retain
    return DomainPlan(paradigm, tuple(forget), tuple(retain))


#: CCUP retain weight μ used when none is given, per paradigm. ``"domain"``: chosen on PACS *train* with the demo
#: model (``scripts/measure_domains.py --choose-mu``, ``docs/domains.md``) as the μ with the most of four
#: domain-specific tasks at the seed paper's goal, then the lowest mean forgotten cell: μ = 30 (the domain-aware
#: projections of issue 22; one task of four at the goal). The others keep the library's long-standing 100.
DEFAULT_CCUP_MU: dict[str, float] = {"global": 100.0, "domain": 30.0, "complete": 100.0}


def default_ccup_mu(paradigm: str) -> float:
    """The CCUP retain weight μ a ``paradigm`` uses when none is given (:data:`DEFAULT_CCUP_MU`)."""
    if paradigm not in DEFAULT_CCUP_MU:
        raise ValueError(f"`paradigm` must be one of {list(PARADIGMS)}, got {paradigm!r}.")
    return DEFAULT_CCUP_MU[paradigm]
