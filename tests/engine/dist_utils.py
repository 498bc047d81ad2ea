"""Helpers for engine tests: tiny models, batches, and real multi-process gloo groups."""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.engine.recompute import prepare_activation_checkpointing
from loco.model.gpt import GPT, GPTConfig

TIMEOUT = datetime.timedelta(seconds=60)

TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def tiny_gpt(seed: int = 0, cfg: GPTConfig = TINY) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def batches(steps: int, batch: int, seed: int = 1, cfg: GPTConfig = TINY) -> list[torch.Tensor]:
    """``steps`` global batches of shape (batch, seq_len + 1) of random tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
        for _ in range(steps)
    ]


def _entry(
    rank: int, world: int, path: str, backend: str, fn: Callable[..., Any], args: tuple
) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if _uses_checkpointing(args):
        prepare_activation_checkpointing()  # before the group exists (see its docstring)
    store = dist.FileStore(path, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _uses_checkpointing(args: tuple) -> bool:
    """Whether any config dict among ``args`` (or lists of them) turns on checkpointing."""
    items = [c for a in args for c in (a if isinstance(a, list) else [a])]
    return any(isinstance(c, dict) and c.get("activation_checkpointing") for c in items)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes in one group of ``backend``
    (gloo, or nccl with rank r on GPU r).

    An exception on any rank fails the caller (``mp.spawn`` re-raises it with its traceback).
    """
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "store")
        mp.spawn(_entry, args=(world, path, backend, fn, args), nprocs=world, join=True)
