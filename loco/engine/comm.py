"""Collective helpers: process-group facts, byte accounting, and the reduce flavours we use.

Every reduction is a SUM followed by our own divide (gloo's ``ReduceOp.AVG`` has given silently
wrong results, pytorch#162338). All calls go through :class:`Comm` so a benchmark can count the
bytes each rank puts into collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVES = ("auto", "reduce", "allreduce")


@dataclass
class CommStats:
    """Payload bytes handed to collectives by this rank, by kind.

    Conventions (the ZeRO paper's): an all-reduce of n bytes counts 2n (a reduce-scatter plus an
    all-gather); a reduce of n bytes to an owner counts n; an all-gather counts the full output
    n; a broadcast counts n on every rank.
    """

    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + n

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()


class Comm:
    """The collectives of one process group (or none for a single rank).

    Args:
        group: the process group; None means the default group when one is initialized.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.backend = dist.get_backend(group) if self.active else "none"
        self.stats = CommStats()

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce(self, t: torch.Tensor) -> dist.Work | None:
        self.stats.add("all_reduce", 2 * t.numel() * t.element_size())
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def reduce(self, t: torch.Tensor, dst: int) -> dist.Work | None:
        self.stats.add("reduce", t.numel() * t.element_size())
        return dist.reduce(
            t, dst=self.global_rank(dst), op=dist.ReduceOp.SUM, group=self.group, async_op=True
        )

    def broadcast(self, t: torch.Tensor, src: int) -> dist.Work | None:
        self.stats.add("broadcast", t.numel() * t.element_size())
        return dist.broadcast(t, src=self.global_rank(src), group=self.group, async_op=True)

    def all_gather_into(self, out: torch.Tensor, shard: torch.Tensor) -> dist.Work | None:
        self.stats.add("all_gather", out.numel() * out.element_size())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return gather(out, shard, group=self.group, async_op=True)

    def all_reduce_scalar(self, x: torch.Tensor) -> torch.Tensor:
        """Blocking SUM of a small tensor (not counted: a few bytes)."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def resolve(self, collective: str) -> str:
        """The gradient collective to use: ``reduce`` (to each owner) or ``allreduce``.

        ``auto`` picks ``reduce`` on every backend: on NCCL it is a ring reduce with the
        bandwidth of a reduce-scatter; on gloo it was measured against the all-reduce (which is
        what gloo's own reduce-scatter runs underneath) by ``scripts/bench/zero_step.py``.
        """
        if collective not in COLLECTIVES:
            raise ValueError(f"zero.collective={collective!r}; choose one of {COLLECTIVES}")
        return "reduce" if collective == "auto" else collective
