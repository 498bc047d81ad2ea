"""ZeRO stage 0 with expert rows (``loco.engine.experts``): the dense part replicated, as at
stage 0, and each expert value's fp32 master and moments on one rank only, as at stage 1.

A rank's compute copy holds the dense part and the expert rows it computes (``P - X + X/ep``
values, laid out by ``experts.plan_unit``). Its fp32 masters, gradient and moments cover
:class:`ReplicaSpace`: the union of the dense values and its uniform shard ``[lo, hi)`` in flat
order, ``(P - X) + |X ∩ [lo, hi)|`` values instead of P. The shard is one contiguous window of
that space, so ``master_range()`` / ``optim_state_range()`` (checkpoints, gossip, joins) are
live views as at every other stage: one rank may read them at any time, no collective and no
staging copy. (Holding the masters of the rank's own rows instead would leave the shard's
other experts elsewhere: the range API would need a gathered copy of the shard, ``12 P/N``
bytes, refreshed after every step.)

One step: the dense gradients are all-reduced (stage 0's sums), the expert rows' gradients go
point to point to their master's owner (stage 1's moves); every rank steps its whole space;
then the dense masters are copied into the compute copy locally and the expert rows move from
their master's owner to the ranks computing them (``experts.publish_compact``). After writes to
the range API, :meth:`ReplicaSpace.sync` broadcasts each shard's dense values from its owner.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from loco.engine.flat import FlatLayout, intersect
from loco.site_comm import SiteComm

if TYPE_CHECKING:
    from loco.engine.experts import ExpertRows


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of ``spans`` as sorted, disjoint, non-touching intervals."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[0] < s[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


class ReplicaSpace:
    """The fp32 buffers' layout of one rank at stage 0 with expert rows (module docstring).

    Args:
        layout: the flat layout.
        experts: the global spans of the declared (expert) parameters.
        world, rank: the group.
    """

    def __init__(self, layout: FlatLayout, experts: list[tuple[int, int]], world: int,
                 rank: int) -> None:  # fmt: skip
        self.layout, self.world, self.rank = layout, world, rank
        self.lo, self.hi = layout.shard_range(rank, world)
        cuts = [0, *(x for s in _merge(experts) for x in s), layout.numel]
        self.dense = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=True) if a < b]
        self.experts = _merge(experts)
        self.segments = _merge([*self.dense, (self.lo, self.hi)])
        self._starts = [a for a, _ in self.segments]
        self._pos, at = [], 0
        for a, b in self.segments:
            self._pos.append(at)
            at += b - a
        self.size = at
        """Values in each of this rank's fp32 buffers (masters, gradient, each moment)."""
        self.window = self.at(self.lo)
        """Where the shard ``[lo, hi)`` starts in those buffers."""

    def at(self, g: int) -> int:
        """The buffer position of global index ``g`` (which must be in the space)."""
        k = bisect.bisect_right(self._starts, g) - 1
        a, b = self.segments[k]
        if not a <= g <= b:
            raise AssertionError(f"index {g} is outside rank {self.rank}'s space")
        return self._pos[k] + g - a

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """The view of the shard ``[lo, hi)`` in buffer ``t`` (the shards partition the flat
        space: their squared norms sum to the whole vector's)."""
        return t[self.window : self.window + self.hi - self.lo]

    def runs(self) -> list[tuple[int, int, bool]]:
        """The optimizer's runs ``(lo, hi, decay)`` in buffer positions: the dense parameters'
        runs (the same on every rank, so replicas take the same steps) and the shard's expert
        runs, never merged across the two."""
        pieces = self.dense + [x for e in self.experts if (x := intersect(e, (self.lo, self.hi)))]
        out = []
        for a, b in sorted(pieces):
            shift = self.at(a) - a
            out += [(s + shift, t + shift, d) for s, t, d in self.layout.decay_runs((a, b))]
        return out

    def fill(self, full: torch.Tensor) -> torch.Tensor:
        """A new fp32 buffer holding ``full``'s (the padded flat vector's) values of the space."""
        out = torch.empty(self.size, dtype=torch.float32)
        for (a, b), p in zip(self.segments, self._pos, strict=True):
            out[p : p + b - a].copy_(full[a:b])
        return out

    @torch.no_grad()
    def sync(self, tensors: list[torch.Tensor], comm: SiteComm) -> None:
        """After writes to the shard of each of ``tensors`` (masters, moments) on every rank:
        broadcast each shard's dense values from its owner, so the replicas agree again.
        Collective; the expert values are already on their only holder."""
        works = []
        for r in range(self.world):
            lo, hi = self.layout.shard_range(r, self.world)
            for d in self.dense:
                if (x := intersect(d, (lo, hi))) is not None:
                    a = self.at(x[0])
                    works += [comm.broadcast(t[a : a + x[1] - x[0]], r) for t in tensors]
        for w in works:
            w.wait()


def replica_space(layout: FlatLayout, rows: ExpertRows | None,
                  rank: int | None = None) -> ReplicaSpace | None:  # fmt: skip
    """The space of ``rank`` (default ``rows.rank``) for the declared ``rows``; None without."""
    if rows is None:
        return None
    spans = [(layout.specs[i].offset, layout.specs[i].end) for i in rows.spans]
    return ReplicaSpace(layout, spans, rows.world, rows.rank if rank is None else rank)
