"""Process groups for a site's local ranks: spawned by loco itself, or started by torchrun."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_ENV = "LOCO_COLLECTIVE_TIMEOUT_SEC"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(
        seconds=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S))
    )


def under_torchrun() -> bool:
    """True when torchrun (or another launcher using its environment) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``cpu``, ``cuda`` (this rank's local GPU) or ``auto`` (cuda when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "site.device=cuda but torch sees no CUDA device; use site.device=cpu or auto"
            )
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower site.nproc"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_group(
    *, backend: str, rank: int, world: int, init_method: str, checkpointing: bool = False
) -> None:
    """Join this rank's process group; ``checkpointing``: the engine will use activation
    checkpointing (its imports must come first, see ``prepare_activation_checkpointing``)."""
    if checkpointing:
        from loco.engine.recompute import prepare_activation_checkpointing

        prepare_activation_checkpointing()
    _pick_interface(backend)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=collective_timeout(),
    )


def _pick_interface(backend: str) -> None:
    """A site on several machines: unless the user chose one, gloo's (NCCL's bootstrap) network
    interface is the one that routes to the rendezvous host. Their default is the address the
    host name resolves to, often loopback, which the other machines cannot reach."""
    master = os.environ.get("MASTER_ADDR", "")
    var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    if not master or var in os.environ:
        return
    from loco.gossip.rank_address import collective_interface

    name = collective_interface(master)
    if name is not None:
        os.environ[var] = name


def spawn(fn: Callable[..., Any], nproc: int, args: tuple) -> None:
    """Run ``fn(rank, *args)`` in ``nproc`` fresh processes; if one fails, the others are ended."""
    mp.start_processes(fn, args=args, nprocs=nproc, join=True, start_method="spawn")
