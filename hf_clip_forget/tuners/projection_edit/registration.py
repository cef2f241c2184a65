"""Registering ``projection_edit`` as a peft method, without modifying peft.

peft 0.21's public ``register_peft_method`` only accepts names that are already members of its closed
``PeftType`` enum, so this module keeps its own ``str`` enum member and fills the same three public mapping dicts
that ``register_peft_method`` fills, with the same uniqueness checks. Registration is idempotent.
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


class ProjectionEditType(str, enum.Enum):
    """The peft type of forget adapters. A ``str`` enum, as transformers reads ``peft_type.value``."""

    PROJECTION_EDIT = "PROJECTION_EDIT"


PEFT_TYPE = ProjectionEditType.PROJECTION_EDIT
#: Attribute prefix of the adapter state; equal to transformers' ``f"{peft_type.value.lower()}_"``.
PREFIX = "projection_edit_"
#: The ``peft_type`` written to ``adapter_config.json``. peft looks this string up in its registry; without
#: ``import hf_clip_forget`` the lookup fails with ``KeyError: <this string>``, so the string itself tells the user
#: what to do. Both it and the plain enum value resolve to our config class once the package is imported.
SAVED_PEFT_TYPE = "PROJECTION_EDIT (registered by hf_clip_forget: run `import hf_clip_forget` before loading)"


def register_projection_edit(config_cls: type, model_cls: type) -> None:
    """Make peft resolve ``PROJECTION_EDIT`` (and :data:`SAVED_PEFT_TYPE`) to our config and tuner classes."""
    if (
        PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is model_cls
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(SAVED_PEFT_TYPE) is config_cls
    ):
        return
    if PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING and PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is not model_cls:
        raise KeyError(f"Another package already registered a peft method named {PEFT_TYPE.value!r}.")
    owners = [key for key, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PREFIX and key != PEFT_TYPE]
    if owners:
        raise KeyError(f"The adapter prefix {PREFIX!r} is already used by peft method {owners[0]!r}.")
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = model_cls
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = config_cls
    PEFT_TYPE_TO_CONFIG_MAPPING[SAVED_PEFT_TYPE] = config_cls
