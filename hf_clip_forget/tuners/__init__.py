"""Layer 2 — peft glue. One folder per peft method, as in ``peft.tuners``."""

from .projection_edit import ProjectionEditConfig, ProjectionEditModel


__all__ = ["ProjectionEditConfig", "ProjectionEditModel"]
