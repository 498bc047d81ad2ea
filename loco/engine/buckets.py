"""Gradient buckets of the ZeRO engine: the plan, launching each reduction as its bucket fills,
and folding the reduced pieces into the gradient (phase 2 of ``loco.engine.zero``'s docstring).

A bucket is a set of whole parameters (in stage 3 one block's) reduced together. Buckets fill
in reverse layer order during backward and are launched strictly in bucket order as
asynchronous SUMs: an all-reduce (stage 0, or ``collective=allreduce``), else one ``reduce``
to each owning rank (the uneven-range form of a reduce-scatter).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch

from loco.engine.experts import GRAD_TAG, ExpertRows, Move, plan_unit
from loco.engine.flat import FlatLayout
from loco.engine.replica import ReplicaSpace
from loco.site_comm import SiteComm


@dataclass
class Bucket:
    """Gradients of a set of whole parameters, reduced together.

    ``spans`` are the bucket's contiguous global ranges; its buffer is their concatenation.
    ``pieces`` split the buffer by owner: ``(owner, buf_lo, buf_hi, global_lo, global_hi)``.
    """

    index: int
    spans: list[tuple[int, int]]
    params: list[int]
    pos: dict[int, int]
    size: int
    pieces: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)  # expert rows, point to point (experts.py)
    ready: int = 0
    launched: bool = False
    buf: torch.Tensor | None = None
    works: list[Any] = field(default_factory=list)
    received: list[tuple[Move, torch.Tensor]] = field(default_factory=list)


def plan_groups(layout: FlatLayout, limit: int) -> list[list[int]]:
    """Parameter indices per bucket, in reverse layer order, each at least ``limit`` values
    (the last one may be smaller)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in reversed(range(len(layout.specs))):
        cur.append(i)
        size += layout.specs[i].numel
        if size >= limit:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


class GradBuckets:
    """The buckets of one engine and the reductions in flight.

    Args:
        layout: the engine's flat layout.
        groups: parameter indices per bucket, in launch order (:func:`plan_groups`, or one
            block's parameters per bucket in stage 3).
        grad: the engine's fp32 gradient: the full vector (stages 0-1) or this rank's shard
            ``[lo, lo + len)`` (stages 2-3).
        lo: the first global index of ``grad`` (0 in stages 0-1).
        stage, collective, reduce_dtype, max_inflight: as ``ZeroEngine``'s.
        rows: stage 3's expert rows (``loco.engine.experts``): a bucket holds only this rank's
            rows of those parameters and sends them to the owners of their master pieces.
        space: stage 0 with expert rows (``loco.engine.replica``; with ``stage`` 2 and
            ``collective`` ``allreduce``): ``grad`` is laid out by it and every rank keeps
            every dense piece.
    """

    def __init__(self, *, layout: FlatLayout, groups: list[list[int]], comm: SiteComm,
                 grad: torch.Tensor, lo: int, stage: int, collective: str,
                 reduce_dtype: torch.dtype, max_inflight: int,
                 rows: ExpertRows | None = None,
                 space: ReplicaSpace | None = None) -> None:  # fmt: skip
        self.layout, self.comm, self.grad, self.lo = layout, comm, grad, lo
        self.space = space
        self.stage, self.collective = stage, collective
        self.reduce_dtype, self.max_inflight = reduce_dtype, max_inflight
        self.device = grad.device
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        for k, idx in enumerate(groups):
            plan = plan_unit(layout, idx, rows, comm.world)
            order = sorted(idx, key=lambda i: layout.specs[i].offset)
            b = Bucket(k, plan.segments, order, plan.pos, plan.size, plan.pieces, plan.moves)
            self.buckets.append(b)
            for i in order:
                self.bucket_of[i] = b
        self._next = 0
        self._inflight: collections.deque[Bucket] = collections.deque()
        self.overlapped = 0
        """Buckets launched from inside backward (before autograd finished), since the start."""

    def __len__(self) -> int:
        return len(self.buckets)

    @torch.no_grad()
    def add(self, i: int, g: torch.Tensor) -> None:
        """Accumulate parameter ``i``'s gradient ``g`` (into the gradient or its bucket)."""
        spec = self.layout.specs[i]
        if self.stage < 2:
            self.grad[spec.offset : spec.end].add_(g.reshape(-1))
            return
        b = self.bucket_of[i]
        if b.buf is None:
            b.buf = torch.zeros(b.size, dtype=self.reduce_dtype, device=self.device)
        b.buf[b.pos[i] : b.pos[i] + g.numel()].add_(g.reshape(-1))  # expert rows: this rank's

    def mark_ready(self, i: int) -> bool:
        """Parameter ``i``'s gradient is final for this step: launch every bucket that is now
        complete, in order. Returns whether ``i``'s bucket is complete."""
        b = self.bucket_of[i]
        b.ready += 1
        while self._next < len(self.buckets) and self._complete(self.buckets[self._next]):
            self._launch(self.buckets[self._next])
            self._next += 1
            self.overlapped += 1
        return self._complete(b)

    @staticmethod
    def _complete(b: Bucket) -> bool:
        return b.ready == len(b.params)

    def flush(self) -> None:
        """Launch every bucket not launched yet (in order), wait for all, and reset."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        while self._inflight:
            self._finish(self._inflight.popleft())
        for b in self.buckets:
            b.ready, b.launched = 0, False
        self._next = 0

    def _allreduce(self) -> bool:
        return self.stage == 0 or self.collective == "allreduce"

    def _launch(self, b: Bucket) -> None:
        if self.stage < 2:
            a, e = b.spans[0]
            view = self.grad[a:e]
            b.buf = view if self.reduce_dtype == torch.float32 else view.to(self.reduce_dtype)
        elif b.buf is None:  # no gradient reached this bucket on this rank: contribute zeros
            b.buf = torch.zeros(b.size, dtype=self.reduce_dtype, device=self.device)
        works = []
        if self.comm.multi:
            if self._allreduce() and not b.moves:
                works.append(self.comm.all_reduce(b.buf))
            elif self._allreduce():  # the dense pieces only: the expert rows differ by rank
                works += [self.comm.all_reduce(b.buf[bs:be]) for _, bs, be, _, _ in b.pieces]
            else:
                for r, bs, be, _, _ in b.pieces:
                    works.append(self.comm.reduce(b.buf[bs:be], r))
            works += self._send_rows(b)
        b.works, b.launched = works, True
        self._inflight.append(b)
        if self.stage >= 2:
            while len(self._inflight) > self.max_inflight:
                self._finish(self._inflight.popleft())

    def _send_rows(self, b: Bucket) -> list[Any]:
        """Expert rows' gradients from the ranks computing them to their master's owner."""
        assert b.buf is not None
        me, works = self.comm.rank, []
        for m in b.moves:
            if m.computer == me and m.owner != me:
                piece = b.buf[m.buf : m.buf + m.hi - m.lo]
                works.append(self.comm.send(piece, m.owner, GRAD_TAG))
            elif m.owner == me and m.computer != me:
                got = torch.empty(m.hi - m.lo, dtype=self.reduce_dtype, device=self.device)
                works.append(self.comm.recv(got, m.computer, GRAD_TAG))
                b.received.append((m, got))
        return works

    @torch.no_grad()
    def _finish(self, b: Bucket) -> None:
        for w in b.works:
            w.wait()
        buf = b.buf
        assert buf is not None
        rank = self.comm.rank
        if self.stage < 2:
            if buf.dtype != self.grad.dtype:
                a, e = b.spans[0]
                if self._allreduce():
                    self.grad[a:e].copy_(buf)
                else:
                    for r, bs, be, s, t in b.pieces:
                        if r == rank:
                            self.grad[s:t].copy_(buf[bs:be])
        else:
            for r, bs, be, s, t in b.pieces:
                if r == rank or self.space is not None:
                    self._slot(s, t).add_(buf[bs:be])
            for m in b.moves:
                if m.owner == rank and m.computer == rank:
                    self._slot(m.lo, m.hi).add_(buf[m.buf : m.buf + m.hi - m.lo])
            for m, got in b.received:
                self._slot(m.lo, m.hi).add_(got)
        b.buf, b.works, b.received = None, [], []

    def _slot(self, s: int, t: int) -> torch.Tensor:
        """The gradient's view of global values ``[s, t)`` (stages 2-3)."""
        a = s - self.lo if self.space is None else self.space.at(s)
        return self.grad[a : a + t - s]
