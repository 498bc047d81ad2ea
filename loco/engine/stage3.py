"""ZeRO stage 3 parameters: each transformer block gathered just before use, freed after.

Units are the root (every trainable parameter outside ``model.blocks``: embeddings, final norm,
the tied head) and one unit per block. A unit's compute buffer is the concatenation of its flat
spans; the module's parameters are views of it. Freeing resizes the buffer's storage to zero
bytes; gathering resizes it back and fills it, so the parameter views (and any reference
autograd saved in forward) see the data again without being rebuilt.

Communication: a gather is one asynchronous broadcast per owner of each piece of the unit (rank
r's shard of the flat space is contiguous, so a block's pieces have uneven sizes across ranks;
broadcasts from the owners move the same bytes per rank as an all-gather would).

Schedule (installed as module hooks):

- model forward pre-hook: gather the root (wait), prefetch block 0;
- block k forward pre-hook: wait for block k, prefetch block k+1;
- block k forward post-hook: free block k, and wrap its output in an identity autograd node
  whose backward gathers block k again (wait) and prefetches block k-1;
- the engine frees block k when all its gradients have arrived, and everything after backward.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loco.engine.experts import GATHER_TAG, ExpertRows, Move, plan_unit
from loco.engine.flat import FlatLayout
from loco.site_comm import SiteComm

_FREE, _INFLIGHT, _READY = "free", "inflight", "ready"


@dataclass
class Unit:
    """Parameters gathered and freed together (one block, or the root)."""

    index: int
    spans: list[tuple[int, int]]
    params: list[int]
    buf: torch.Tensor
    pieces: list[tuple[int, int, int, int, int]]
    moves: list[Move] = field(default_factory=list)  # expert rows, point to point (experts.py)
    state: str = _READY
    works: list[Any] = field(default_factory=list)
    sending: list[torch.Tensor] = field(default_factory=list)  # held until the sends finish


class _PreBackward(torch.autograd.Function):
    """Identity on a block's output whose backward gathers the block's parameters."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, owner: BlockShards, unit: int) -> torch.Tensor:
        ctx.owner, ctx.unit = owner, unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.owner.pre_backward(ctx.unit)
        return grad, None, None


def unit_of(model: nn.Module, name: str) -> int:
    """The unit of parameter ``name``: 1 + k inside ``model.blocks[k]``, else 0 (the root)."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            return 1 + int(parts[1])
    return 0


class BlockShards:
    """The stage-3 units of one model on one rank.

    Args:
        model: the model; its trainable parameters become views of the unit buffers.
        layout: the model's flat layout.
        comm: the group's collectives.
        master: this rank's fp32 master shard (global indices ``[lo, lo + len)``), read at
            every gather; the engine updates it in place.
        lo: the first global index of ``master``.
        full: the initial fp32 flat vector (to fill the buffers before the first free).
        dtype: compute dtype of the buffers.
        device: where the buffers live.
        prefetch: gather the next unit while the current one computes.
        rows: the expert rows each rank computes (``loco.engine.experts``): this rank's unit
            buffers hold only its rows of those parameters. None: every parameter whole.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: FlatLayout,
        comm: SiteComm,
        master: torch.Tensor,
        lo: int,
        full: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device,
        prefetch: bool,
        rows: ExpertRows | None = None,
    ) -> None:
        self.model, self.layout, self.comm = model, layout, comm
        self.master, self.lo, self.prefetch = master, lo, prefetch
        self.hold = False
        blocks = getattr(model, "blocks", None)
        n_units = 1 + (len(blocks) if isinstance(blocks, nn.ModuleList) else 0)
        members: list[list[int]] = [[] for _ in range(n_units)]
        for i, spec in enumerate(layout.specs):
            members[unit_of(model, spec.name)].append(i)
        self.units: list[Unit] = []
        with torch.no_grad():
            for u, idx in enumerate(members):
                plan = plan_unit(layout, idx, rows, comm.world)
                buf = torch.empty(plan.size, dtype=dtype, device=device)
                pos = 0
                for a, b in plan.segments:
                    buf[pos : pos + b - a].copy_(full[a:b])
                    pos += b - a
                for i in idx:
                    shape = rows.kept_shape(i) if rows is not None else layout.specs[i].shape
                    start = plan.pos[i]
                    layout.params[i].data = buf[start : start + math.prod(shape)].view(shape)
                unit = Unit(u, plan.segments, idx, buf, plan.pieces, plan.moves)
                self.units.append(unit)
                self.free(unit)

    def install(self) -> list[Any]:
        """Register the forward hooks; returns their handles."""
        handles = [
            self.model.register_forward_pre_hook(self._root_pre),
            self.model.register_forward_hook(self._root_post),
        ]
        blocks = getattr(self.model, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for k, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(functools.partial(self._pre, k + 1)))
                handles.append(block.register_forward_hook(functools.partial(self._post, k + 1)))
        return handles

    @torch.no_grad()
    def gather(self, unit: Unit) -> None:
        """Start broadcasting every owner's piece of ``unit`` (no-op unless it is free)."""
        if unit.state != _FREE:
            return
        unit.buf.untyped_storage().resize_(unit.buf.numel() * unit.buf.element_size())
        works = []
        for r, bs, be, s, t in unit.pieces:
            piece = unit.buf[bs:be]
            if r == self.comm.rank:
                piece.copy_(self.master[s - self.lo : t - self.lo])
            if self.comm.world > 1:
                works.append(self.comm.broadcast(piece, r))
        for m in unit.moves:
            works += self._move(unit, m)
        unit.works, unit.state = works, _INFLIGHT

    def _move(self, unit: Unit, m: Move) -> list[Any]:
        """Expert rows from the master's owner to a rank computing them (point to point)."""
        me, n = self.comm.rank, m.hi - m.lo
        if m.owner == me:
            src = self.master[m.lo - self.lo : m.hi - self.lo]
            if m.computer == me:
                unit.buf[m.buf : m.buf + n].copy_(src)
                return []
            src = src.to(unit.buf.device, unit.buf.dtype)  # a copy if they differ: held until sent
            unit.sending.append(src)
            return [self.comm.send(src, m.computer, GATHER_TAG)]
        if m.computer == me:
            return [self.comm.recv(unit.buf[m.buf : m.buf + n], m.owner, GATHER_TAG)]
        return []

    def wait(self, unit: Unit) -> None:
        """Make ``unit`` usable (gathering it first if it is free)."""
        self.gather(unit)
        for w in unit.works:
            w.wait()
        unit.works, unit.sending, unit.state = [], [], _READY

    def free(self, unit: Unit) -> None:
        """Release ``unit``'s buffer (after any broadcast into it has finished)."""
        if unit.state == _FREE:
            return
        for w in unit.works:
            w.wait()
        unit.works, unit.sending = [], []
        unit.buf.untyped_storage().resize_(0)
        unit.state = _FREE

    def free_all(self) -> None:
        for u in self.units:
            self.free(u)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every unit materialized inside the block. Collective."""
        for u in self.units:
            self.gather(u)
        for u in self.units:
            self.wait(u)
        self.hold = True
        try:
            yield
        finally:
            self.hold = False
            self.free_all()

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        self.wait(self.units[0])
        if self.prefetch and len(self.units) > 1:
            self.gather(self.units[1])

    def _root_post(self, module: nn.Module, args: Any, out: Any) -> None:
        if not torch.is_grad_enabled() and not self.hold:
            self.free(self.units[0])  # evaluation: nothing comes back for the root

    def _pre(self, u: int, module: nn.Module, args: Any) -> None:
        self.wait(self.units[u])
        if self.prefetch and u + 1 < len(self.units):
            self.gather(self.units[u + 1])

    def _post(self, u: int, module: nn.Module, args: Any, out: Any) -> Any:
        if not self.hold:
            self.free(self.units[u])
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            return _PreBackward.apply(out, self, u)
        return out

    def pre_backward(self, u: int) -> None:
        self.wait(self.units[u])
        if self.prefetch and u - 1 >= 1:
            self.gather(self.units[u - 1])
