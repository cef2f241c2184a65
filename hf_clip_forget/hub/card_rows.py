"""The rows a model card shows per adapter: what it forgets, where, how (method, strength, templates), the data-free
prediction of its effect, and the notes on the methods used. Text from a config is escaped (a config is untrusted)."""

from __future__ import annotations

import html
import re

from ..core.templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE
from ..tuners.projection_edit.estimate import effect_estimate_line


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#!|~])")


def escape_markdown(text: str) -> str:
    """Text shown as text in Markdown and HTML: ``& < > " '`` become HTML entities, Markdown's inline syntax
    (emphasis, code, links, images, ``|`` of tables) is backslash-escaped, and line breaks become spaces, so a
    value cannot leave its table cell or line."""
    text = " ".join(str(text).split())
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=True))


def target_names(config) -> list[str]:
    targets = config.target_modules or ["visual_projection"]
    return sorted([targets] if isinstance(targets, str) else targets)


def adapter_row(name: str, config, active: bool, audit=None) -> dict:
    """What the card shows of one adapter; with ``audit`` (an ``AuditReport`` of the model), the neighbour words
    the audit did not find gone are listed as targeted, with its finding, not as forgotten."""
    templates = list(config.templates)
    if templates == list(IMAGENET_TEMPLATES):
        described = "CLIP ImageNet ensemble (80)"
    elif templates == list(SINGLE_TEMPLATE):
        described = escape_markdown(f'"{SINGLE_TEMPLATE[0]}"')
    else:
        described = f"{len(templates)} custom: " + ", ".join(escape_markdown(f'"{t}"') for t in templates[:3])
        described += ", …" if len(templates) > 3 else ""
    if config.average_templates and len(templates) > 1:
        described += ", averaged per class"
    ccup = config.method == "ccup"
    return {
        "name": escape_markdown(name),
        "classes": [
            with_neighbours(c, getattr(config, "neighbour_names", {}), audit) for c in config.forgotten_classes
        ],
        "method": config.method + (", shared direction kept" if config.keep_shared_direction else ""),
        "alpha": f"{config.alpha:g}" if config.method == "nullspace" else "–",
        "lambda_mu": (
            f"{config.ccup_lambda:g} / {config.ccup_mu:g}"
            if ccup
            else f"μ {config.logit_mu:g}, margin {config.logit_margin:g}"
            if config.method == "logit"
            else "–"
        ),
        "rank": ", ".join(f"{escape_markdown(m)}: {k}" for m, k in sorted(config.rank_pattern.items())) or "0",
        "targets": ", ".join(f"`{m}`" for m in target_names(config)),
        "templates": described,
        "retain": ", ".join(escape_markdown(c) for c in config.retain_classes) or "–",
        "where": where_forgotten(config),
        "kept_domains": ", ".join(escape_markdown(d) for d in config.retain_domains) or "–",
        "prototypes": (
            f"{config.prototypes} per forget cell"
            + (f", {config.retain_prototypes} per retain cell" if config.retain_prototypes else "")
            if config.prototypes or config.retain_prototypes
            else "none (text only)"
        ),
        "predicted": effect_estimate_line(config),
        "active": active,
    }


#: The audit probe that tries a forgotten class under another name (``hf_clip_forget.audit``).
NEIGHBOUR_PROBE = "neighbour name"


def with_neighbours(name: str, neighbour_names: dict, audit=None) -> str:
    """A forgotten class as the card lists it, with the vocabulary words its edit also targets (``expand_neighbours``).

    Without an audit they are listed as its neighbours, forgotten with it. With one (an ``AuditReport``), a card
    must not claim what its own audit refutes: only the words whose neighbour-name probe says *gone* are listed as
    forgotten; a word the probe found leaking (or only reduced) is listed as targeted, with the probe's numbers, and a
    word the audit did not try as targeted and not probed.
    """
    words = list(neighbour_names.get(name) or [])
    if not words:
        return escape_markdown(name)
    listed = ", ".join(escape_markdown(w) for w in words)
    if audit is None:
        return f"{escape_markdown(name)} (and its neighbours {listed})"
    found = {
        row.subject: row
        for row in audit.rows
        if row.probe == NEIGHBOUR_PROBE and row.forgotten_class == name and row.verdict != "skipped"
    }
    gone = [w for w in words if w in found and found[w].verdict == "gone"]
    kept = [w for w in words if w in found and found[w].verdict != "gone"]
    untried = [w for w in words if w not in found]
    parts = []
    if gone:
        parts.append(f"and its neighbours {', '.join(escape_markdown(w) for w in gone)}, gone in the audit")
    if kept:
        parts.append(
            "targeted but **not forgotten** according to the audit: "
            + "; ".join(f"{escape_markdown(w)} {_finding(found[w])}" for w in kept)
        )
    if untried:
        parts.append(f"targeted, not tried by the audit: {', '.join(escape_markdown(w) for w in untried)}")
    return f"{escape_markdown(name)} ({'; '.join(parts)})"


def _finding(row) -> str:
    """A neighbour-name row's verdict and numbers: "(leaks: 1.00 of … after the edit, 1.00 before, chance 0.17)"."""
    return (
        f"({escape_markdown(row.verdict)}: {row.after:.2f} of the class's held-out prompts recognised as this word "
        f"after the edit, {row.before:.2f} before, chance {row.chance:.2f})"
    )


def where_forgotten(config) -> str:
    """Where the classes are forgotten: everywhere (global) or in the named domains (paradigm)."""
    domains = ", ".join(escape_markdown(d) for d in config.domains)
    if config.paradigm == "global":
        return "everywhere" + (f" (prompts of {domains} included)" if domains else "")
    return f"only in {domains} ({config.paradigm})"


def method_notes(configs) -> str:
    methods = {config.method for config in configs}
    notes = []
    if "nullspace" in methods:
        notes.append(
            "*nullspace*: `W' = (I − α QQᵀ) W`, `Q` an orthonormal basis of the forgotten classes' text embeddings; "
            "at α = 1 every image embedding is orthogonal to them, for α < 1 their component is scaled by 1 − α."
        )
    if "ccup" in methods:
        notes.append(
            "*ccup*: `M = argmin ‖M − I‖² + λ‖M T_f‖² + μ‖M T_r − T_r‖²` (closed form) on the text directions; the "
            "image projection becomes `W' = Mᵀ W`, so every image's logits are those of the edited directions: the "
            "forgotten classes' near 0, the retained classes' kept."
        )
    if "logit" in methods:
        notes.append(
            "*logit*: the image projection becomes `W' = (I − Σ_k w_k b_kᵀ) W`, `w_k` the forgotten class's dual "
            "vector among the named classes' prompt directions (so no other class's logit moves), `b_k` the smallest "
            "direction (weighted by μ on the kept cells' prompts) that puts the class `margin` below the best other "
            "class on its own forget prompts (`hf_clip_forget.core.logit_edit`)."
        )
    if any(config.paradigm != "global" for config in configs):
        notes.append(
            '*domain paradigms*: the forget subspace is built from domain-conditioned prompts ("a sketch of a dog."); '
            "*domain* keeps the same classes in the other domains through CCUP's retain term, *complete* does not "
            "protect them (a stronger erasure in the named domains)."
        )
    if any(config.prototypes for config in configs):
        notes.append(
            "*visual prototypes*: images synthesised (seeded) so that their image embedding matches each forget "
            "prompt; their embeddings join the forget subspace and cover the image side of the modality gap."
        )
    if any(config.keep_shared_direction for config in configs):
        notes.append(
            "*shared direction kept*: the forget directions are taken orthogonal to the mean direction of all named "
            "classes (forgotten and retained), so a forgotten class's score falls to about the average score instead "
            "of 0 and the other classes keep what they share."
        )
    return "\n".join(f"- {note}" for note in notes)


__all__ = [
    "NEIGHBOUR_PROBE",
    "adapter_row",
    "escape_markdown",
    "method_notes",
    "target_names",
    "where_forgotten",
    "with_neighbours",
]
