"""Kept so that ``from resnext_flax.weights.resolve import ...`` goes on working: what a
foreign checkpoint holds is resolved in ``weights.foreign``."""

from resnext_flax.weights.foreign.report import CheckpointLayoutError, CheckpointReport
from resnext_flax.weights.foreign.resolve import resolve_checkpoint
from resnext_flax.weights.foreign.survey import CheckpointOptions

__all__ = ["CheckpointLayoutError", "CheckpointOptions", "CheckpointReport",
           "resolve_checkpoint"]
