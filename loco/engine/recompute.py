"""Activation checkpointing of a model's blocks: recompute each block in backward."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def prepare_activation_checkpointing() -> None:
    """Import what ``torch.utils.checkpoint`` imports on its first call (``torch._dynamo``).

    Call it before ``init_process_group`` in every process that will train with
    ``activation_checkpointing``. Importing ``torch._dynamo`` while a process group exists
    makes torch keep that group alive past ``destroy_process_group()`` (torch 2.13, gloo):
    its worker threads then live into interpreter shutdown, and a worker that drops a finished
    collective's tensor there needs the GIL and aborts the process ("terminate called without
    an active exception"; docs/LOG.md, 2026-11-26). Imported first, nothing keeps the group.
    """
    import torch._dynamo  # noqa: F401


def checkpoint_blocks(model: nn.Module, *, in_group: bool = False) -> None:
    """Wrap the forward of every block of ``model.blocks`` so that, when gradients are
    enabled, its activations are recomputed in backward instead of kept. ``in_group``: the
    process is one rank of a group (warns when :func:`prepare_activation_checkpointing` was
    not called before the group was made)."""
    if in_group and "torch._dynamo" not in sys.modules:
        warnings.warn(
            "zero.activation_checkpointing: call loco.engine.recompute."
            "prepare_activation_checkpointing() before init_process_group, else the process "
            "group outlives destroy_process_group() and the process may abort at exit",
            stacklevel=3,
        )
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            "zero.activation_checkpointing needs model.blocks (an nn.ModuleList of "
            "transformer blocks); disable it for this model"
        )
    for block in blocks:
        orig = block.forward

        def ckpt_forward(*args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        block.forward = ckpt_forward
