"""The site communicator: every collective among one site's ranks goes through :class:`SiteComm`.

A site's ranks form one torch.distributed process group (gloo on CPU, NCCL on GPU; its timeout is
``loco.dist.collective_timeout``). Code that needs the site's ranks takes one ``SiteComm`` instead
of ``rank``/``world``/``group`` arguments. With one rank (or torch.distributed not initialized)
every collective returns its input at once, so single-rank code runs the same calls.

Two kinds of call:
- bulk tensor collectives (``all_reduce``, ``reduce``, ``broadcast``, ``all_gather_into``): the
  engine's; asynchronous, their payload bytes counted in ``stats``;
- small blocking ones for control and figures (``sum``, ``mean``, ``min``, ``max``, ``barrier``,
  ``broadcast_object``, ``all_gather_object``): a few values, not counted.

Every reduction is a SUM (or MIN/MAX) followed by our own divide: gloo's ``ReduceOp.AVG`` has
given silently wrong results (pytorch#162338).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = ("auto", "reduce", "allreduce")


@dataclass
class CommStats:
    """Payload bytes handed to bulk collectives by this rank, by kind.

    Conventions (the ZeRO paper's): an all-reduce of n bytes counts 2n (a reduce-scatter plus an
    all-gather); a reduce of n bytes to an owner counts n; an all-gather counts the full output
    n; a broadcast counts n on every rank; a point-to-point send counts n on the sender.
    """

    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + n

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()


def small_device(backend: str) -> torch.device:
    """Where the small collectives' tensors live: NCCL reduces only tensors on the rank's
    current GPU (a CPU tensor raises); gloo and a site of one rank take CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SiteComm:
    """The collectives of one site's ranks.

    Args:
        group: the site's process group; None is the default group when torch.distributed is
            initialized, else a site of one rank.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.backend = dist.get_backend(group) if self.active else "none"
        self.stats = CommStats()

    @classmethod
    def single(cls) -> SiteComm:
        """A site of one rank, whatever torch.distributed's state (no call communicates)."""
        comm = cls.__new__(cls)
        comm.group, comm.active, comm.world, comm.rank = None, False, 1, 0
        comm.backend, comm.stats = "none", CommStats()
        return comm

    @property
    def small_device(self) -> torch.device:
        """Where the small collectives' tensors go (read per call: under NCCL the rank's
        current GPU, which the launcher sets after the group is made)."""
        return small_device(self.backend)

    @property
    def multi(self) -> bool:
        """More than one rank: the collectives communicate."""
        return self.world > 1

    def global_rank(self, site_rank: int) -> int:
        if self.group is None:
            return site_rank
        return dist.get_global_rank(self.group, site_rank)

    # ---------------------------------------------------------------- bulk (async, counted)

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

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> dist.Work | None:
        """Rank i's chunk j of ``inp`` (equal chunks along dim 0) into rank j's chunk i of
        ``out``; counts the whole input (the mixture-of-experts dispatch and combine)."""
        self.stats.add("all_to_all", inp.numel() * inp.element_size())
        return dist.all_to_all_single(out, inp, group=self.group, async_op=True)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> dist.Work | None:
        """``t`` to site rank ``dst`` (point to point; stage 3's expert rows)."""
        self.stats.add("send", t.numel() * t.element_size())
        return dist.isend(t, dst=self.global_rank(dst), group=self.group, tag=tag)

    def recv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work | None:
        """Into ``t`` from site rank ``src`` (the matching :meth:`send`; not counted)."""
        return dist.irecv(t, src=self.global_rank(src), group=self.group, tag=tag)

    def subgroup(self, size: int) -> SiteComm:
        """This rank's group when the site's ranks are cut into consecutive groups of ``size``
        (expert parallelism inside a site). Collective: every rank calls it with the same size."""
        if size < 1 or self.world % size:
            raise ValueError(f"a group of {size} ranks does not divide the site's {self.world}")
        if size == self.world:
            return self
        if size == 1:
            return SiteComm.single()
        from loco.dist import collective_timeout

        mine = None
        for start in range(0, self.world, size):
            ranks = [self.global_rank(r) for r in range(start, start + size)]
            group = dist.new_group(ranks, timeout=collective_timeout())
            if start <= self.rank < start + size:
                mine = group
        return SiteComm(mine)

    def all_gather_shards(self, full: torch.Tensor, lo: int, hi: int) -> None:
        """Every rank's equal-size shard of ``full`` (this rank's is ``[lo, hi)``) to every rank,
        blocking. On gloo one asynchronous broadcast per owner, all in flight at once, measured
        ~3x faster than gloo's all-gather for 4 MiB at N=2 (docs/zero-engine.md); elsewhere
        ``all_gather_into_tensor``."""
        if self.backend == "gloo":
            size = hi - lo
            works = [self.broadcast(full[r * size : (r + 1) * size], r) for r in range(self.world)]
            for w in works:
                w.wait()
        else:
            self.all_gather_into(full, full[lo:hi]).wait()

    # ---------------------------------------------------------------- small (blocking)

    def _reduce_small(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        if self.multi:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def _small(self, values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=dtype, device=self.small_device)

    def sum_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """In-place SUM of a small tensor over the site's ranks; returns it. Under NCCL ``x``
        must live on this rank's GPU."""
        return self._reduce_small(x, dist.ReduceOp.SUM)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the site's ranks (float64)."""
        return self.sum_tensor(self._small(values, torch.float64)).tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """``values`` averaged element-wise over the site's ranks (float64)."""
        return [v / self.world for v in self.sum(values)]

    def min(self, values: Sequence[float]) -> list[float]:
        """Element-wise minimum over the site's ranks (float64)."""
        return self._reduce_small(self._small(values, torch.float64), dist.ReduceOp.MIN).tolist()

    def max_int(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of integers over the site's ranks."""
        t = self._reduce_small(self._small(values, torch.int64), dist.ReduceOp.MAX)
        return [int(x) for x in t.tolist()]

    def barrier(self) -> None:
        if self.multi:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Site rank ``src``'s ``obj`` on every rank (picklable; the others pass anything)."""
        if not self.multi:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in site-rank order."""
        if not self.multi:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Every parameter and buffer of ``module`` from site rank ``src`` (blocking)."""
        if not self.multi:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=self.global_rank(src), group=self.group)

    def resolve(self, collective: str) -> str:
        """The gradient collective to use: ``reduce`` (to each owner) or ``allreduce``.

        ``auto`` picks ``reduce`` on every backend: on NCCL it is a ring reduce with the
        bandwidth of a reduce-scatter; on gloo it was measured against the all-reduce (which is
        what gloo's own reduce-scatter runs underneath) by ``scripts/bench/zero_step.py``.
        """
        if collective not in COLLECTIVES:
            raise ValueError(f"zero.collective={collective!r}; choose one of {COLLECTIVES}")
        return "reduce" if collective == "auto" else collective
