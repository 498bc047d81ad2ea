"""Expert-parallel parameters at ZeRO stages 0-3: rows of stacked parameters that only some ranks
compute, kept (gathered, freed, reduced) by those ranks only.

A model may declare, through ``model.expert_rows(world)``, parameters whose first dimension is
split among the site's ranks: ``{name: [(a_r, b_r) for each site rank r]}``, rank r computing
rows ``[a_r, b_r)`` (an MoE layer's experts: ``loco.model.moe_gpt.MoEGPT.expert_rows``). At
stage 3 rank r's block buffer then holds only its rows of such a parameter (the parameter
becomes a view of shape ``(b_r - a_r, ...)``), and those rows move point to point:

- **gather**: from the owner of each piece of the fp32 master shard (the uniform partition of
  ``loco.engine.flat``, unchanged: the outer loop, checkpoints and gossip see the same ranges)
  to each rank that computes it;
- **gradient**: from each rank that computes it to the owner of the master piece, which sums
  what arrives (ranks computing the same rows are data-parallel replicas) into its gradient
  shard.

At stages 1 and 2 the same plan lays out the whole compute copy (``plan_unit`` over every parameter:
the dense part and this rank's rows, ``P - X + X/ep`` values for X expert values), kept between
steps; the fp32 masters get their own buffer (they can no longer be a view of it), the gradient
buckets send expert rows to their master's owner as at stage 3, and :func:`publish_compact`
replaces the all-gather after a step. Stage 0 lays out its copy the same way and keeps its fp32
buffers on ``loco.engine.replica.ReplicaSpace`` (the dense part replicated, each expert value
on its shard's owner).

Everything else (the dense parameters) is gathered and reduced by the group's collectives as
before. Without declared rows a unit is laid out exactly as ``FlatLayout.spans_of`` lays it
out, so dense models are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loco.engine.flat import FlatLayout
from loco.engine.replica import ReplicaSpace, replica_space
from loco.site_comm import SiteComm

GATHER_TAG, GRAD_TAG = 17, 18
"""Point-to-point tags: gathers match gathers and gradients match gradients, each in issue
order (every rank walks the same moves in the same order)."""


@dataclass(frozen=True)
class Move:
    """Global values ``[lo, hi)`` between the master owner ``owner`` and the rank ``computer``
    that computes them; ``buf``: where they sit in this rank's unit buffer (when this rank is
    ``computer``; -1 otherwise)."""

    owner: int
    computer: int
    lo: int
    hi: int
    buf: int


@dataclass(frozen=True)
class UnitPlan:
    """One unit's (or bucket's) buffer on this rank: ``segments`` ``(lo, hi)`` in buffer order,
    ``pieces`` of the dense segments by owner ``(owner, buf_lo, buf_hi, lo, hi)`` (the
    collectives), ``moves`` of the expert rows (point to point), ``pos`` of each parameter."""

    segments: list[tuple[int, int]]
    pieces: list[tuple[int, int, int, int, int]]
    moves: list[Move]
    pos: dict[int, int]
    size: int


class ExpertRows:
    """The rows of each declared parameter that each rank of a ``world``-rank group computes.

    Args:
        layout: the flat layout (full shapes: every rank's flat space holds every row).
        rows: ``{name: [(a_r, b_r) per rank]}``; validated against the layout.
        world, rank: the group.
    """

    def __init__(self, layout: FlatLayout, rows: Mapping[str, Sequence[tuple[int, int]]],
                 world: int, rank: int) -> None:  # fmt: skip
        self.layout, self.world, self.rank = layout, world, rank
        self.spans: dict[int, list[tuple[int, int]]] = {}
        for name, per_rank in rows.items():
            spec = layout.spec(name)
            if len(per_rank) != world:
                raise ValueError(
                    f"expert rows of {name}: {len(per_rank)} entries for {world} ranks"
                )
            row = spec.numel // spec.shape[0]
            spans = []
            for a, b in per_rank:
                if not 0 <= a < b <= spec.shape[0]:
                    raise ValueError(f"expert rows [{a}, {b}) of {name} outside {spec.shape[0]}")
                spans.append((spec.offset + a * row, spec.offset + b * row))
            self.spans[layout.index(name)] = spans

    @classmethod
    def of(cls, model: nn.Module, layout: FlatLayout, world: int, rank: int) -> ExpertRows | None:
        """The model's declaration (``model.expert_rows(world)``), or None when it has none."""
        declare = getattr(model, "expert_rows", None)
        rows = declare(world) if declare is not None and world > 1 else {}
        return cls(layout, rows, world, rank) if rows else None

    def kept(self, i: int) -> tuple[int, int]:
        """The global span of parameter ``i`` this rank keeps (the whole one unless declared)."""
        if i in self.spans:
            return self.spans[i][self.rank]
        s = self.layout.specs[i]
        return s.offset, s.end

    def own_spans(self) -> list[tuple[int, tuple[int, int]]]:
        """``(i, kept(i))`` for each declared parameter ``i``."""
        return [(i, spans[self.rank]) for i, spans in self.spans.items()]

    def kept_shape(self, i: int) -> tuple[int, ...]:
        shape = self.layout.specs[i].shape
        if i not in self.spans:
            return shape
        lo, hi = self.spans[i][self.rank]
        return ((hi - lo) // (self.layout.specs[i].numel // shape[0]), *shape[1:])

    def plan(self, indices: list[int]) -> UnitPlan:
        """The buffer of the parameters ``indices`` on this rank (see :class:`UnitPlan`)."""
        return plan_unit(self.layout, indices, self, self.world)


def plan_unit(layout: FlatLayout, indices: list[int], rows: ExpertRows | None,
              world: int) -> UnitPlan:  # fmt: skip
    """:meth:`ExpertRows.plan`; with ``rows`` None, the layout's own spans (no moves)."""
    order = sorted(indices, key=lambda i: layout.specs[i].offset)
    segments: list[tuple[int, int, bool]] = []
    pos: dict[int, int] = {}
    size = 0
    for i in order:
        expert = rows is not None and i in rows.spans
        lo, hi = rows.kept(i) if rows is not None else (layout.specs[i].offset, layout.specs[i].end)
        pos[i] = size
        if segments and segments[-1][1] == lo and not expert and not segments[-1][2]:
            segments[-1] = (segments[-1][0], hi, False)
        else:
            segments.append((lo, hi, expert))
        size += hi - lo
    pieces, at = [], 0
    for lo, hi, expert in segments:
        if not expert:
            pieces += [
                (r, at + s - lo, at + t - lo, s, t) for r, s, t in layout.owners((lo, hi), world)
            ]
        at += hi - lo
    moves = _moves(layout, order, rows, pos, world) if rows is not None else []
    return UnitPlan([(a, b) for a, b, _ in segments], pieces, moves, pos, size)


def _moves(layout: FlatLayout, order: list[int], rows: ExpertRows, pos: dict[int, int],
           world: int) -> list[Move]:  # fmt: skip
    """Every (master owner, computing rank) piece of the declared rows in ``order``, the same
    list on every rank."""
    out = []
    for i in order:
        for c, (lo, hi) in enumerate(rows.spans.get(i, [])):
            for r, s, t in layout.owners((lo, hi), world):
                buf = pos[i] + s - lo if c == rows.rank else -1
                out.append(Move(r, c, s, t, buf))
    return out


def expert_rows(model: nn.Module, layout: FlatLayout, comm: SiteComm, *, stage: int,
                device: torch.device, offload_params: str, offload: str = "none",
                compute_dtype: torch.dtype = torch.float32) -> ExpertRows | None:  # fmt: skip
    """The expert rows a ZeRO engine keeps per rank: at stages 0-3; not with the parameter tier
    (its reads are the dense pieces'), nor at stages 0-2 with an optimizer offload (its step
    writes the range's compute copy, which is not contiguous here), nor for CUDA tensors on
    gloo (whose point-to-point ops take host memory), nor at stages 0 and 2 when it would not
    save memory; None otherwise. Stage 1 always saves: its fp32 gradient becomes the shard
    (P/N instead of P, see ``loco.engine.zero``). Stage 0 replicates only the dense part of
    its fp32 buffers (``loco.engine.replica``)."""
    if offload_params != "none" or (stage < 3 and offload != "none"):
        return None
    if device.type != "cpu" and comm.backend == "gloo":
        return None
    rows = ExpertRows.of(model, layout, comm.world, comm.rank)
    if rows is None or stage in (1, 3):
        return rows
    if stage == 0:
        return rows if _stage0_saves(layout, rows, comm.world, compute_dtype) else None
    # stage 2: the copy loses X (1 - 1/ep) values; in fp32 the masters, a view of the full copy
    # until now, need their own P/N (padded) values
    left_out = sum(layout.specs[i].numel - (b - a) for i, (a, b) in rows.own_spans())
    own_masters = layout.padded_numel(comm.world) // comm.world
    return rows if compute_dtype != torch.float32 or left_out > own_masters else None


def _stage0_saves(layout: FlatLayout, rows: ExpertRows, world: int,
                  compute_dtype: torch.dtype) -> bool:  # fmt: skip
    """Whether stage 0's compact copy (``P - X + X/ep``) and fp32 buffers on the replica space
    (masters, gradient, two moments) hold fewer bytes than the full copy and its fp32 buffers
    (the masters a view of the copy in fp32), on every rank (the same answer on each)."""
    size, padded = compute_dtype.itemsize, layout.padded_numel(world)
    worst = 0
    for r in range(world):
        left_out = sum(layout.specs[i].numel - (b - a) for i, s in rows.spans.items()
                       for a, b in [s[r]])  # fmt: skip
        space = replica_space(layout, rows, r)
        assert space is not None
        worst = max(worst, (layout.numel - left_out) * size + 16 * space.size)
    return worst < padded * (size + 12 + (0 if size == 4 else 4))


@torch.no_grad()
def publish_compact(params: torch.Tensor, master: torch.Tensor, lo: int, plan: UnitPlan,
                    comm: SiteComm, space: ReplicaSpace | None = None) -> None:  # fmt: skip
    """Stages 1-2 with expert rows: write the masters (this rank's shard, from global ``lo``)
    into the compute parameters ``params`` laid out by ``plan``: the dense pieces broadcast from
    their owners, the expert rows point to point from their master's owner to each rank
    computing them. Collective. With ``space`` (stage 0, ``loco.engine.replica``) ``master``
    is laid out by it and holds every dense value: those are copied, not broadcast."""
    me, works, sending = comm.rank, [], []
    at = space.at if space is not None else (lambda g: g - lo)
    for r, bs, be, s, _ in plan.pieces:
        if r == me or space is not None:
            params[bs:be].copy_(master[at(s) : at(s) + be - bs])
        if comm.world > 1 and space is None:
            works.append(comm.broadcast(params[bs:be], r))
    for m in plan.moves:
        n = m.hi - m.lo
        if m.owner == me:
            src = master[at(m.lo) : at(m.lo) + n]
            if m.computer == me:
                params[m.buf : m.buf + n].copy_(src)
                continue
            sending.append(src.to(params.device, params.dtype))  # held until sent
            works.append(comm.send(sending[-1], m.computer, GATHER_TAG))
        elif m.computer == me:
            works.append(comm.recv(params[m.buf : m.buf + n], m.owner, GATHER_TAG))
    for w in works:
        w.wait()
