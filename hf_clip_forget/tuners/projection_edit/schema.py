"""The declared shape of a forget adapter's config, checked once wherever a config enters: a saved
``adapter_config.json`` is untrusted input.

:func:`read_config_json` reads the file strictly (size, UTF-8, JSON without NaN, bounded nesting, an object at the
top); :func:`check_config_values` checks every field against :data:`CONFIG_SCHEMA` (types, lengths, nesting) and
answers with one message naming the field and what was expected. Range checks that need several fields at once
(ranks against shapes, the calibration record against the strength) stay with the config class.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .names import is_valid_adapter_name


#: Largest adapter_config.json accepted: a 20,000-class label set with templates and calibration fits easily.
MAX_CONFIG_BYTES = 64 * 2**20
#: Deepest nesting of lists and objects accepted anywhere in a config (the calibration record is the deepest: 5).
MAX_DEPTH = 12
#: Longest string accepted in a name-like field (class, template, module, domain).
MAX_NAME_CHARS = 1000
#: Fields that steer one load (set as `from_pretrained(..., verify_base_fingerprint=False)`); a saved config that
#: holds them is refused: a file must not be able to switch a check off.
LOAD_OPTIONS = ("verify_base_fingerprint", "trust_unverified")


class ConfigSchemaError(ValueError):
    """A config field does not have the declared shape; the message names the field and what was expected."""


# ------------------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class Spec:
    """``accepts(value)`` is the whole check; ``expected`` says it in words for the message."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and "\x00" not in value


def _are_names(values) -> bool:
    """:func:`_is_name` of every item, in a few C-level passes (a config may list 20,000 retain class names)."""
    if not set(map(type, values)) <= {str}:
        return all(_is_name(item) for item in values)  # str subclasses and the rest: one by one
    lengths = list(map(len, values))
    return not lengths or (min(lengths) > 0 and max(lengths) <= MAX_NAME_CHARS and "\x00" not in "".join(values))


def _list_of(check) -> Callable[[Any], bool]:
    if check is _is_name:
        return lambda value: isinstance(value, (list, tuple)) and _are_names(value)
    return lambda value: isinstance(value, (list, tuple)) and all(check(item) for item in value)


def _dict_of(check) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, Mapping) and all(_is_name(k) and check(v) for k, v in value.items())


def _optional(check) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


_HEX64 = re.compile(r"[0-9a-f]{64}")
STRING = Spec("a string", lambda v: isinstance(v, str) and "\x00" not in v)
OPTIONAL_STRING = Spec("a string or null", _optional(STRING.accepts))
BOOL = Spec("true or false", lambda v: isinstance(v, bool))
NUMBER = Spec("a finite number", _is_number)
OPTIONAL_NUMBER = Spec("a finite number or null", _optional(_is_number))
COUNT = Spec("an integer >= 0", lambda v: _is_int(v) and v >= 0)
NAMES = Spec("a list of non-empty strings", _list_of(_is_name))
OPTIONAL_NAMES = Spec("a list of non-empty strings, or null", _optional(_list_of(_is_name)))
TARGETS = Spec(
    'a list of layer names (the family\'s image and/or text embedding layer, e.g. ["visual_projection"]), or null',
    lambda v: v is None or (isinstance(v, (list, tuple, set, frozenset)) and _are_names(list(v))),
)
RANKS = Spec("an object mapping layer names to integers >= 1", _dict_of(lambda v: _is_int(v) and v >= 1))
SHAPES = Spec(
    "an object mapping layer names to [out_features, in_features]",
    _dict_of(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)),
)
NAME_LISTS = Spec("an object mapping names to lists of non-empty strings", _dict_of(_list_of(_is_name)))
CHECKSUMS = Spec(
    "an object mapping '<layer>.forget' / '<layer>.retain' to sha256 hex digests",
    _dict_of(lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None),
)
FINGERPRINTS = Spec("an object mapping layer names to fingerprint objects", _dict_of(lambda v: isinstance(v, Mapping)))
RECORD = Spec("an object", lambda v: isinstance(v, Mapping))
OPTIONAL_RECORD = Spec("an object or null", lambda v: v is None or isinstance(v, Mapping))

#: Every field of a forget adapter's config, peft's own included, with its declared shape.
CONFIG_SCHEMA: dict[str, Spec] = {
    # peft's PeftConfig
    "peft_type": OPTIONAL_STRING,
    "task_type": Spec("null (forget adapters have no task type)", lambda v: v is None),
    "auto_mapping": OPTIONAL_RECORD,
    "peft_version": OPTIONAL_STRING,
    "base_model_name_or_path": OPTIONAL_STRING,
    "revision": OPTIONAL_STRING,
    "inference_mode": BOOL,
    "modules_to_save": OPTIONAL_NAMES,
    "target_parameters": OPTIONAL_NAMES,
    # ProjectionEditConfig
    "target_modules": TARGETS,
    "exclude_modules": Spec(
        "null: forget adapters edit exactly their `target_modules`",
        lambda v: v is None or (isinstance(v, (list, tuple, set, frozenset)) and not v),
    ),
    "method": STRING,
    "alpha": NUMBER,
    "keep_shared_direction": BOOL,
    "paradigm": STRING,
    "domains": NAMES,
    "retain_domains": NAMES,
    "domain_templates": NAME_LISTS,
    "prototypes": COUNT,
    "retain_prototypes": COUNT,
    "prototype_options": RECORD,
    "ccup_lambda": NUMBER,
    "ccup_mu": OPTIONAL_NUMBER,
    "logit_mu": NUMBER,
    "logit_margin": NUMBER,
    "rank_pattern": RANKS,
    "retain_rank_pattern": RANKS,
    "projection_shapes": SHAPES,
    "forgotten_classes": NAMES,
    "expand_neighbours": COUNT,
    "neighbour_names": NAME_LISTS,
    "retain_classes": NAMES,
    "templates": NAMES,
    "average_templates": BOOL,
    "rank_tolerance": NUMBER,
    "embedding_source": STRING,
    "tokenizer_name_or_path": OPTIONAL_STRING,
    "mergeable": BOOL,
    "stack": Spec(
        "a list of adapter names (letters, digits, '_' and '-'; they name the stack's subfolders)",
        _list_of(is_valid_adapter_name),
    ),
    "factor_checksums": CHECKSUMS,
    "base_fingerprints": FINGERPRINTS,
    "base_model_revision": OPTIONAL_STRING,
    "provenance": RECORD,
    "calibration": RECORD,
}


#: List and object fields whose ``null`` means "empty" (what the config class's default is).
EMPTY_WHEN_NULL = {
    name: spec
    for name, spec in CONFIG_SCHEMA.items()
    if spec in (NAMES, NAME_LISTS, RANKS, SHAPES, CHECKSUMS, FINGERPRINTS, RECORD)
}


def check_config_values(values: Mapping[str, Any]) -> None:
    """Check every known field of ``values`` against :data:`CONFIG_SCHEMA` (and the nesting of the whole); a
    ``null`` list or object field counts as empty (:data:`EMPTY_WHEN_NULL`).

    Raises:
        ConfigSchemaError: naming the first field that does not have its declared shape.
    """
    for name, spec in CONFIG_SCHEMA.items():
        if name in EMPTY_WHEN_NULL and values.get(name, ()) is None:
            continue
        if name in values and not spec.accepts(values[name]):
            raise ConfigSchemaError(_message(name, spec, values[name]))
        if name in values:
            check_depth(values[name], name)
    if isinstance(values.get("target_modules"), str):
        raise ConfigSchemaError(_message("target_modules", TARGETS, values["target_modules"]))


def _message(name: str, spec: Spec, value) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    hint = ""
    if name == "target_modules" and isinstance(value, str):
        hint = (
            " A string is peft's regular-expression form, which forget adapters do not take: they edit exactly "
            "the embedding layers they name."
        )
    elif name == "exclude_modules":
        hint = " Name the layers to edit in `target_modules` (or `target='visual'`/`'text'` in add_forget_adapter)."
    return (
        f"Adapter config field `{name}` must be {spec.expected}, got {shown}.{hint} A saved config with this value "
        "is corrupt or was altered; re-download or rebuild the adapter."
    )


def check_depth(value, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse lists/objects nested deeper than ``limit`` (iteratively: a deep value cannot exhaust the stack)."""
    pending = [(value, 0)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, Mapping):
            children = current.values()
        elif isinstance(current, (list, tuple)):
            children = current
        else:
            continue
        if depth >= limit:
            raise ConfigSchemaError(
                f"Adapter config field `{where}` is nested more than {limit} levels deep; no forget adapter config "
                "is. The file is corrupt or was altered."
            )
        containers = [child for child in children if isinstance(child, (Mapping, list, tuple))]  # leaves end here
        pending.extend((child, depth + 1) for child in containers)


# ---------------------------------------------------------------------------------------------------- the file
def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object of an adapter config file, read strictly: at most :data:`MAX_CONFIG_BYTES`, UTF-8 (a BOM
    is allowed), no NaN/Infinity, nested at most :data:`MAX_DEPTH` deep, an object at the top.

    Raises:
        ConfigSchemaError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigSchemaError(
            f"{path} is {size:,} bytes; an adapter config is at most {MAX_CONFIG_BYTES:,}. The file is not a forget "
            "adapter's config (or was altered)."
        )
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigSchemaError(f"{path} is UTF-16 encoded; adapter configs are UTF-8 JSON. Re-save it as UTF-8.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigSchemaError(f"{path} is not UTF-8 text ({error}); adapter configs are UTF-8 JSON.") from None
    try:
        values = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise ConfigSchemaError(f"{path} is not valid JSON ({error}); the adapter is corrupt.") from None
    except RecursionError:
        raise ConfigSchemaError(
            f"{path} is nested too deeply to be an adapter config; the file is corrupt or was altered."
        ) from None
    if not isinstance(values, dict):
        raise ConfigSchemaError(f"{path} holds a JSON {type(values).__name__}, not an object; the adapter is corrupt.")
    check_depth(values, os.path.basename(path))
    return values


def _refuse_constant(name: str):
    raise ConfigSchemaError(f"adapter configs hold finite numbers only, found {name}")


def refuse_load_options(values: Mapping[str, Any], where: str) -> None:
    """A saved config may not carry a load option (:data:`LOAD_OPTIONS`): it would switch a check off."""
    found = [name for name in LOAD_OPTIONS if name in values]
    if found:
        raise ConfigSchemaError(
            f"{where} holds {found}, which are options of one load, never saved: a file must not switch off the "
            "checks of the adapter it carries. The config was altered; pass the option to `from_pretrained` "
            "yourself if you mean it."
        )


__all__ = [
    "CONFIG_SCHEMA",
    "LOAD_OPTIONS",
    "ConfigSchemaError",
    "check_config_values",
    "check_depth",
    "read_config_json",
    "refuse_load_options",
]
