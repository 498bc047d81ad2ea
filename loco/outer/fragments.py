"""Streaming fragments (``outer.fragments = F``; Streaming DiLoCo, arXiv 2501.18512).

The model's flat space ``[0, P)`` is cut into ``F`` contiguous pieces of (almost) equal size,
fragment ``f = [f * P // F, (f + 1) * P // F)``: the same on every site whatever its rank count.
A rank handles the intersection of each fragment with its owned range ``[lo, hi)`` (possibly
empty). Fragment ``f`` syncs every ``H`` inner steps, at the steps
``loco.outer.schedule.Schedule`` gives it, so one sync moves ``1 / F`` of a round's payload and
the link is busy evenly instead of in bursts.

Each fragment is a small outer problem of its own: its sync runs the round logic
(:class:`~loco.outer.round.Rounds`) on VIEWS of the fragment's piece of the master weights, of
phi and momentum (an :class:`~loco.outer.methods.OuterState` over views of the rank's state, so
the update lands in place) and of the error-feedback residual, with a
:class:`~loco.outer.exchange.RangePayloads` over the piece. The rank's whole state stays the
one that checkpoints and joins read. A fragment's sync counter (``OuterState.rounds``, which
DiLoCo reads) is a function of the round: ``t - 1`` before round ``t``'s sync, so it is right
after a resume or a join too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loco.outer.exchange import RangePayloads
from loco.outer.flat_view import FlatView
from loco.outer.methods import OuterState
from loco.outer.round import Rounds
from loco.outer.sliced import SlicedReduce


def fragment_bounds(P: int, F: int, f: int) -> tuple[int, int]:
    """Fragment ``f`` of ``F`` of the flat space ``[0, P)``."""
    return f * P // F, (f + 1) * P // F


def piece(P: int, F: int, f: int, lo: int, hi: int) -> tuple[int, int]:
    """The part ``[a, b)`` of fragment ``f`` inside ``[lo, hi)``; ``a == b`` when none."""
    flo, fhi = fragment_bounds(P, F, f)
    a = min(max(lo, flo), hi)
    return a, max(a, min(hi, fhi))


class FlatPiece:
    """The window ``[a, b)`` of a :class:`FlatView`'s owned range, seen as a flat view whose
    shard and owned range are both ``[a, b)``; :meth:`sync` syncs the whole engine."""

    def __init__(self, flat: FlatView, a: int, b: int) -> None:
        assert flat.lo <= a <= b <= flat.hi, (flat.lo, a, b, flat.hi)
        self.parent = flat
        self.lo = self.slo = a
        self.hi = self.shi = b

    def master(self) -> torch.Tensor:
        """A writable view of the master weights on ``[a, b)``."""
        return self.parent.master()[self.lo - self.parent.lo : self.hi - self.parent.lo]

    def sync(self) -> None:
        """Propagate writes to the compute parameters. Collective."""
        self.parent.sync()


class Fragments:
    """The ``F`` fragments of one rank, each with its own :class:`Rounds` over views.

    Args:
        F: fragments (>= 2).
        flat: the engine's flat view; state: the rank's outer state (its phi and momentum
            are viewed, never replaced).
        payloads: the rank's :class:`RangePayloads` (None: local). Its error-feedback
            residual is the one the fragments' encoders update, slice by slice.
        payloads_for: ``payloads_for((a, b))``, a :class:`RangePayloads` with the same options
            whose shard and owned range are ``[a, b)`` (required with ``payloads``).
        sliced: DiLoCo's sliced reduce (``loco.outer.sliced``) per fragment: the members cut
            the FRAGMENT ``[f * P // F, (f + 1) * P // F)`` into their slices, so a sync moves
            ``2 (n - 1) / n`` of the fragment's delta (False: every partner's whole piece).
        rounds_kw: the other :class:`Rounds` arguments (method, node, site, all_live, mix,
            pool, pull_timeout_s, and publish: the loop's ``publish(rid, stream, buf, label)``).
    """

    def __init__(self, *, F: int, flat: FlatView, state: OuterState,
                 payloads: RangePayloads | None,
                 payloads_for: Callable[[tuple[int, int]], RangePayloads] | None,
                 sliced: bool = False, **rounds_kw: Any) -> None:  # fmt: skip
        if payloads is not None and payloads_for is None:
            raise ValueError("fragments need payloads_for to encode a fragment's piece")
        self.F = F
        self.spans = [piece(flat.numel, F, f, flat.lo, flat.hi) for f in range(F)]
        self.rounds: list[Rounds] = []
        for f, (a, b) in enumerate(self.spans):
            view = OuterState(phi=state.phi[a - flat.lo : b - flat.lo],
                              momentum=state.momentum[a - flat.lo : b - flat.lo])  # fmt: skip
            part = None
            if payloads is not None:
                part = payloads_for((a, b))
                if payloads.ef is not None and part.ef is not None:
                    # the fragment's encoder updates its slice of the rank's residual in place
                    part.ef.residual = payloads.ef.residual[a - payloads.slo : b - payloads.slo]
            reduce = None
            if sliced and part is not None:
                flo, fhi = fragment_bounds(flat.numel, F, f)
                reduce = SlicedReduce(node=rounds_kw["node"], payloads=part, site=rounds_kw["site"],
                                      P=fhi - flo, base=flo, pool=rounds_kw["pool"],
                                      pull_timeout_s=rounds_kw["pull_timeout_s"])  # fmt: skip
            self.rounds.append(Rounds(flat=FlatPiece(flat, a, b), state=view, payloads=part,
                                      sliced=reduce, **rounds_kw))  # fmt: skip

    def rounds_for(self, j: int, t: int, f: int) -> Rounds:
        """Fragment ``f``'s rounds, made ready for sync ``j`` of round ``t``: its sync counter
        is ``t - 1`` and its encoder's seed counter ``j - 1`` (both functions of the step)."""
        fr = self.rounds[f]
        fr.state.rounds = t - 1
        if fr.payloads is not None and fr.payloads.ef is not None:
            fr.payloads.ef.calls = j - 1
        return fr

    def span(self, j: int) -> tuple[int, int]:
        """The piece ``[a, b)`` of sync ``j``'s fragment on this rank."""
        return self.spans[(j - 1) % self.F]

    def publish(self, node: Any, j: int, stream: str, buf: Any, label: str) -> None:
        """Publish ``buf`` (this rank's encoded piece of sync ``j``'s fragment) as one
        segment; a rank without a piece of the fragment publishes nothing (no partner asks)."""
        from loco.gossip import Segment

        a, b = self.span(j)
        if a < b:
            seg = Segment.make(a, b, buf, codec=label, grid_bytes=node.server.chunk_bytes)
            node.publish(j, stream, None, segments=[seg])
