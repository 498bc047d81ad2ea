"""Sequential landing: a NoLoCo group meets at one point with one coded phi per group.

In the two-way exchange every member sends its phi through the lattice and pulls toward what it
decoded, so coding noise parts the members. Here (``outer.phi_landing=true``) one member, the
round's leader, has its phi decoded by the others (the lattice, next to their own phi); every
follower ``f`` sends back its offset ``(phi_f - phi_leader) / n`` from the leader's DECODED phi,
a value both ends know, through a plain codec (``ternary`` by default); and every member lands on

    L = phi_leader (decoded) + sum over followers of their decoded offsets  (in name order)

which is the group's mean up to coding error, bitwise the same on every member. Coding noise
moves the group, never parts it, and only the leader's message needs side information. A site
sends the lattice frame when it leads and an offset (~0.2 bytes per value) when it follows.

Feedback ("miss"): the landing misses the exact mean by the leader's coding error over n plus
every follower's offset coding error; each member knows its own part and subtracts it from its
phi the next time phi is coded (``eff = phi - miss``), so the misses do not pile up.

A follower whose lattice block failed its check does not land there (it keeps its own phi; its
offset there is zero, so the leader's landing point is its own decoded value). Any failed pull
of the landing (the leader's phi, an offset) means this site does not land this round: the
momentum step on the deltas it has, no pull. The miss is in checkpoints (``outer.landing_miss``,
:mod:`loco.state`), not served to joiners: a joiner starts without one. With partners of another
rank count a block across a rank edge fails, as in the lattice. ``loco.build.lands`` says where
it runs: NoLoCo, the lattice phi, whole rounds (no fragments), phi every round. The toy behind
it: scripts/experiments/phi_rate.py; figures in docs/outer.md, "Sequential landing".
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

OFFSET_STREAM = "phioff"


def leader_of(members: list[str], rid: int) -> str:
    """The round's leader: the members in name order, rotating with ``rid`` (the round id, or
    the meeting's number: ``loco.outer.schedule.Meetings.index``; each site leads about 1/n of
    its rounds, so the bytes even out)."""
    names = sorted(members)
    return names[rid % len(names)]


def drawn_leader(members: list[str], key: int) -> str:
    """The round's leader drawn from SHA-256 of the meeting's number and the group: for
    pairings where one pair meets at a fixed stride (``gossip.pairing=hypercube``: every
    ``k``-th meeting), where :func:`leader_of`'s rotation would give the same member the lead
    every time (it would never follow, so never learn a window, and send fallback frames)."""
    names = sorted(members)
    digest = hashlib.sha256(f"loco-leader/{key}/{','.join(names)}".encode()).digest()
    return names[int.from_bytes(digest[:8], "big") % len(names)]


class Landing:
    """This rank's side of the sequential landing: its miss, the offset it sends, the point
    it lands on.

    Args:
        payloads: the rank's :class:`loco.outer.exchange.RangePayloads` (lattice phi).
        codec, options: the offsets' code: a ``loco.compress`` codec and its options, or one of
            :data:`loco.outer.offset_code.NAMES` (no options).
        window: how the leader sizes its lattice window: ``history`` (the partner spread seen
            before, ``loco.outer.spread.Spread``), ``sketch`` (also this round's followers'
            sketches, ``loco.outer.phi_sketch``: the leader encodes its frame after pulling
            them) or ``scaled`` (the history's profile over the blocks rescaled to the
            distance the sketches show, :func:`loco.outer.phi_sketch.scaled_spread`).
        last_codec, last_bits: the offsets' code and the leader's lattice bits at the run's
            last ``last_meetings`` meetings (:attr:`last_rounds`, set by the outer loop; None /
            0: as the others). The last landing's miss stays in the weights the final average
            starts from (no later frame takes it back), and half of each member's partner's
            part of the one before (its own part is fed back, the partner's is in the landing
            point), so finer last landings bring the sites closer there.
    """

    def __init__(self, payloads: Any, *, codec: str = "ternary",
                 options: dict[str, object] | None = None, window: str = "history",
                 last_codec: str | None = None, last_options: dict[str, object] | None = None,
                 last_bits: int = 0, last_meetings: int = 1) -> None:  # fmt: skip
        self.payloads, self.codec, self.window = payloads, codec, window
        self.last_codec, self.last_bits = last_codec or codec, last_bits
        payloads.register_codec(codec, dict(options or {}))
        if self.last_codec != codec:
            payloads.register_codec(self.last_codec, dict(last_options or {}))
        self.miss: torch.Tensor | None = None  # on the rank's owned range
        self.last_meetings = last_meetings
        self.last_rounds: frozenset[int] = frozenset()  # the last meetings' rounds (the loop's)

    def _last(self, rid: int) -> bool:
        return rid in self.last_rounds

    def codec_at(self, rid: int) -> str:
        """The offsets' code of round ``rid`` (the same at every member)."""
        return self.last_codec if self._last(rid) else self.codec

    def bits_at(self, rid: int, bits: int) -> int:
        """The leader's lattice bits of round ``rid`` (``bits``: the other rounds')."""
        return self.last_bits if self.last_bits and self._last(rid) else bits

    def eff(self, phi: torch.Tensor) -> torch.Tensor:
        """The phi this site codes: its phi less the miss it knows of."""
        return phi if self.miss is None else phi - self.miss

    def offset(self, own_eff: torch.Tensor, leader: torch.Tensor, n: int, failed: torch.Tensor,
               rid: int = 0):  # fmt: skip
        """A follower's offset ``(eff - leader's decoded phi) / n`` in round ``rid``'s code,
        zero where the leader's block ``failed`` its check. Returns the buffer and codec label
        to publish, the decoded offset, and the miss it leaves (decoded less exact)."""
        exact = torch.where(failed, torch.zeros_like(own_eff), (own_eff - leader) / n)
        buf, label, decoded = self.payloads.encode_plain(exact, self.codec_at(rid))
        return buf, label, decoded, decoded - exact

    @staticmethod
    def point(leader: torch.Tensor, offsets: list[torch.Tensor]) -> torch.Tensor:
        """The landing point: the leader's decoded phi plus the offsets, summed in the order
        given (name order), so every member computes the same bits."""
        out = leader.clone()
        for o in offsets:
            out.add_(o)
        return out

    def leader_miss(self, own_decoded: torch.Tensor, own_eff: torch.Tensor, n: int) -> torch.Tensor:
        """The leader's part of the landing's miss: its own coding error over n."""
        return (own_decoded - own_eff) / n

    def landed(self, miss: torch.Tensor) -> None:
        """The round landed: keep this site's part of the miss for the next coded phi."""
        self.miss = miss.detach().clone()
