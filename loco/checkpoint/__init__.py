"""Checkpoints: save and resume a site's training state."""

from loco.checkpoint.simple import CheckpointError, SimpleCheckpointer

__all__ = ["CheckpointError", "SimpleCheckpointer"]
