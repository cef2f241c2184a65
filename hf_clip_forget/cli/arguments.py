"""From option values to the API's arguments, with the checks that name the option: comma-separated name lists (an
empty one is refused), template sets, class names against the tokenizer (typos) and against ``--data``, JSON output.

A command-line error names the command line's flags (``--classes``), never the API's keywords (``classes=``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import warnings

from ..core.tokenizer_checks import UnknownNameWarning, did_you_mean, unknown_class_names, unknown_domain_names
from .loading import CommandError, one_line


#: The options naming classes and domains that ``forget`` checks for typos, with their ``args`` attributes.
NAME_OPTIONS = {"--classes": "classes", "--retain-classes": "retain_classes"}
DOMAIN_OPTIONS = {"--domains": "domains", "--retain-domains": "retain_domains"}


def split_names(value: str | None) -> list[str] | None:
    """``"cat, dog"`` → ``["cat", "dog"]``; ``None`` stays ``None``."""
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def names_option(args, attribute: str, flag: str) -> list[str] | None:
    """The names of option ``flag`` (``args.<attribute>``), or ``None`` when not given; one given with no name in it
    (``--retain-classes ","``) is a :class:`CommandError` naming the flag."""
    value = getattr(args, attribute, None)
    names = split_names(value)
    if names is not None and not names:
        raise CommandError(
            f"{flag} {value!r} is empty: give at least one name, comma-separated (e.g. {flag} dog,cat)."
        )
    return names


def templates_option(values: list[str] | None):
    """``--templates imagenet`` names a built-in set; several values (or one with ``{}``) are format strings."""
    if values and len(values) == 1 and "{}" not in values[0]:
        return values[0]
    return values


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    try:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
    except OSError as error:
        raise CommandError(f"cannot write --json {path!r}: {one_line(error)}") from error


# --------------------------------------------------------------------------------------------- names and tokenizer
def refuse_unknown_names(tokenizer, args) -> None:
    """A :class:`CommandError` listing every name of ``--classes``, ``--retain-classes``, ``--domains`` and
    ``--retain-domains`` the API would warn about (:class:`~hf_clip_forget.UnknownNameWarning`: a likely typo), each
    with its flag and the closest known words; nothing with ``--allow-unknown-names``."""
    if getattr(args, "allow_unknown_names", False):
        return
    found = [
        (flag, warning)
        for flag, attribute in NAME_OPTIONS.items()
        for warning in unknown_class_names(tokenizer, names_option(args, attribute, flag) or [])
    ] + [
        (flag, warning)
        for flag, attribute in DOMAIN_OPTIONS.items()
        for warning in unknown_domain_names(names_option(args, attribute, flag) or [])
    ]
    if found:
        text = "; ".join(
            f"{flag} {warning.name!r} {warning.reason}"
            + (f": {did_you_mean(warning.suggestions)}" if warning.suggestions else "")
            for flag, warning in found
        )
        raise CommandError(
            f"{text}{'' if text.endswith('?') else '.'} Correct the name, or pass --allow-unknown-names to use it as "
            "written."
        )


@contextlib.contextmanager
def accepting_unknown_names(args):
    """Within this context the API's :class:`~hf_clip_forget.UnknownNameWarning` is silent when the user passed
    ``--allow-unknown-names`` (the names were accepted as written), and shown otherwise."""
    with warnings.catch_warnings():
        if getattr(args, "allow_unknown_names", False):
            warnings.simplefilter("ignore", UnknownNameWarning)
        yield


# ------------------------------------------------------------------------------------------------ names and data
def data_class_names(dataset) -> tuple[list[str], list[str]]:
    """``(every class name, the names of classes with images)`` of ``dataset`` (``load_data``'s); reads the label
    column only (no image is decoded)."""
    from ..evaluation import resolve_columns

    label = resolve_columns(dataset).label
    names = list(dataset.features[label].names)
    return names, [names[i] for i in sorted(set(dataset.unique(label)))]


def refuse_classes_not_in_data(dataset, classes, flags: str, fix: str = "name them as its labels do") -> None:
    """A :class:`CommandError` when ``classes`` (chosen by ``flags``) are not classes of ``--data``, naming the data's
    closest names and ``fix``."""
    names, _ = data_class_names(dataset)
    known = set(names)
    unknown = [name for name in classes or () if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, names, n=3)
            hints.append(f"{name!r} ({did_you_mean(close)})" if close else repr(name))
        raise CommandError(
            f"{flags} names classes that --data does not have: {', '.join(hints)}. Its classes are "
            f"{', '.join(names)}; {fix}."
        )


def refuse_forgetting_every_class(dataset, forget, flags: str) -> None:
    """A :class:`CommandError` when ``forget`` names every class that has images in ``dataset`` (``load_data``'s):
    no image of a kept class is left, so no retain accuracy can be measured — and an edit forgetting every class
    leaves a model that recognises nothing. ``flags`` names the options that chose the classes."""
    _, present = data_class_names(dataset)
    if present and set(present) <= set(forget or ()):
        raise CommandError(
            f"{flags} forgets every class of --data ({', '.join(present)}), so no image of a kept class is left and "
            "no retain accuracy can be measured; forgetting every class leaves a model that recognises nothing. "
            "Forget fewer classes, or give --data with images of the classes to keep."
        )
