"""What an adapter name may be.

An adapter name becomes a folder (``save_pretrained`` writes every adapter but ``"default"`` into a subfolder of
that name), a path component on the Hub, a key of the layers' buffers (``projection_edit_forget.<name>``) and a
component of the state-dict keys that peft saves and filters by name. A shared adapter's names are untrusted input:
a NUL byte, a 10 kB name, a newline or ``../x`` must be refused when the name arrives, not fail (or escape its
folder) at save time.

The allowed form is the one safe in all of those places on every OS: 1 to :data:`MAX_ADAPTER_NAME_LENGTH`
characters, ASCII letters, digits, ``_`` and ``-``, not starting with ``-``. ``.`` is not allowed: torch refuses it
in buffer names (and it would split state-dict keys), so ``..`` and names starting with ``.`` cannot occur either.
Also refused: Windows' reserved device names (``CON``, ``NUL``, ``COM1``…, any case), which cannot be folder names
there, and the names of the modules and buffers on a forget layer's state-dict path (``base_model``, ``model``,
``base_layer``, ``visual_projection``, ``projection_edit_forget``…), which peft would mistake for the adapter's name
when saving another adapter.
"""

from __future__ import annotations

import re

from .registration import PREFIX


#: The longest adapter name accepted (a folder and Hub path component, well under every OS's limit).
MAX_ADAPTER_NAME_LENGTH = 96
_ALLOWED = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_WINDOWS_DEVICES = frozenset(
    ["con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))]
)
#: What the error says an adapter name may be.
ALLOWED_FORM = (
    f"1 to {MAX_ADAPTER_NAME_LENGTH} characters: ASCII letters, digits, '_' and '-', not starting with '-' "
    "(e.g. 'dogs', 'no-cat', 'v1_2'), since it names a folder, a Hub path and the adapter's weights"
)


def check_adapter_name(name) -> str:
    """Return ``name`` if it is a valid adapter name (:data:`ALLOWED_FORM`); else raise one ``ValueError`` naming
    it (its ``repr``, shortened when long) and the allowed form. Checks the name only, never a model."""
    problem = _problem(name)
    if problem is not None:
        raise ValueError(
            f"`adapter_name` {_shown(name)} is not allowed: {problem}. An adapter name is {ALLOWED_FORM}."
        )
    return name


def is_valid_adapter_name(name) -> bool:
    """Whether ``name`` is a valid adapter name (:func:`check_adapter_name` would accept it)."""
    return _problem(name) is None


def _problem(name) -> str | None:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > MAX_ADAPTER_NAME_LENGTH:
        return f"it has {len(name)} characters"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_-"))})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad[:5])}{' …' if len(bad) > 5 else ''}"
    if not _ALLOWED.fullmatch(name):
        return "it starts with '-'"
    if name.lower() in _WINDOWS_DEVICES:
        return "it is a reserved device name on Windows, where it cannot name a folder"
    if name in _reserved_names() or name.startswith(PREFIX):
        return "it is the name of a module or buffer on the path of the adapter's weights, which peft would mistake for it"
    return None


def _shown(name, limit: int = 60) -> str:
    shown = repr(name)
    if len(shown) <= limit:
        return shown
    size = f"{len(name)} characters" if isinstance(name, str) else f"{len(shown)} characters as repr"
    return f"{shown[: limit - 1]}… ({size})"


def _reserved_names() -> frozenset[str]:
    """The components of a forget layer's state-dict keys: peft's wrappers, the layer's own buffers, and every
    family's projection path."""
    from ...families import FAMILIES

    names = {"base_model", "model", "base_layer"}
    for family in FAMILIES:
        for path in family.projections.values():
            names.update(path.split("."))
    return frozenset(names)


__all__ = ["ALLOWED_FORM", "MAX_ADAPTER_NAME_LENGTH", "check_adapter_name", "is_valid_adapter_name"]
