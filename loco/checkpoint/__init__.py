"""Universal checkpoints: per-rank flat ranges, reshardable to any rank count and ZeRO stage.

Public reading API (used by export, sampling and joiners): :func:`latest_checkpoint`,
:func:`read_manifest`, :func:`load_full`, :func:`model_state_dict`. Writing:
:class:`CheckpointWriter` (asynchronous) with :func:`capture`; resuming: :func:`restore`.
The format is in ``docs/checkpoint.md``.
"""

from loco.checkpoint.format import CheckpointError, latest_checkpoint, read_manifest
from loco.checkpoint.reader import Checkpoint, load_full, model_state_dict
from loco.checkpoint.state import capture, restore
from loco.checkpoint.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "capture",
    "latest_checkpoint",
    "load_full",
    "model_state_dict",
    "read_manifest",
    "restore",
]
