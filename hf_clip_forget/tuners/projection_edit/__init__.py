"""Layer 2 — the peft method ``projection_edit``: config, layer, tuner and their registration with peft."""

from .config import ProjectionEditConfig
from .layer import EditSettings, ProjectionEditLayer
from .model import DEFAULT_TARGET_MODULES, ProjectionEditModel, loading_whole_stack
from .modules import Linear, OutputEdit
from .registration import PEFT_TYPE, PREFIX, SAVED_PEFT_TYPE, ProjectionEditType, register_projection_edit
from .transformers_loading import guard_transformers_load_adapter


register_projection_edit(config_cls=ProjectionEditConfig, model_cls=ProjectionEditModel)
guard_transformers_load_adapter()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "PEFT_TYPE",
    "PREFIX",
    "SAVED_PEFT_TYPE",
    "EditSettings",
    "Linear",
    "OutputEdit",
    "ProjectionEditConfig",
    "ProjectionEditLayer",
    "ProjectionEditModel",
    "ProjectionEditType",
    "loading_whole_stack",
    "register_projection_edit",
]
