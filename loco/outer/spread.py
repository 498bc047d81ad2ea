"""How far a partner's phi is from this site's, per lattice block: the history rule that sizes
the next lattice frame's window (:func:`loco.outer.lattice.steps_for_spread`).

A follower decodes its leader's frame next to its own phi; the largest ``|decoded - own|`` of
each block is a partner distance. The next frame, most likely for another partner, is sized
from it, so it should measure how far the sites drift apart in a round:

- A block decoded within half its grid step (``RESOLUTION_STEPS``) shows only the code's
  rounding (round 1, where every site starts from one phi; a pair that met again). It leaves
  the estimate as it was.
- A partner this site also met the round before converges toward it: its distance says
  nothing of the others, who have drifted since. It may widen the estimate, never narrow it,
  and it does not make the estimate recent.
- After ``stale`` rounds without a distance to a new partner the others have drifted for as
  long, so a frame for another group than the one last observed gets no estimate (the
  momentum rule). One pairing held for rounds 2-7 of a 20-round run; round 8's frames, sized
  from a pair converging for five rounds, failed in every block.
"""

from __future__ import annotations

import math

import torch

from loco.outer.lattice import Decoded

# a partner with our own phi decodes within half a step (the rounding), plus fp32 error on
# |phi| / s <= 4096 (the floor): a block's spread up to this many steps is coding error
RESOLUTION_STEPS = 0.501


class Spread:
    """A rank's running estimate, per block, of the largest difference between its phi and a
    partner's (see the module). From a new partner: the new observation where it is larger,
    otherwise a decay toward it; a failed block is widened by ``grow``; a frame with no block
    decoded resets it (``value`` None: the sender's next frame is 8-bit, the momentum rule).
    A frame of only rounding is kept as ``rounding``, with the group it came from: while the
    group stays the same (a pair that keeps meeting has one phi), :meth:`estimate` sizes
    frames from it."""

    def __init__(self, decay: float = 0.5, grow: float = 4.0, stale: int = 2) -> None:
        self.decay, self.grow, self.stale = decay, grow, stale
        self.value: torch.Tensor | None = None
        self.rounding: torch.Tensor | None = None  # the last frame's rounding, if that was all
        self.group: tuple[str, ...] | None = None  # this round's group (``rounding``'s source)
        self.last: tuple[str, ...] | None = None  # the round before's group
        self.age = 0  # rounds begun since a new partner's distance
        self.seen: tuple[str, ...] | None = None  # the group ``value`` last observed
        # sum over blocks of the largest difference squared over the sum of the squared
        # differences, of the frames decoded (None: none yet); for the scaled windows
        self.shape: float | None = None

    def regroup(self, group: tuple[str, ...] | None) -> None:
        """This rank's group of the next round (None: not known), called once a round: another
        group than the one ``rounding`` came from makes it useless."""
        self.age += 1
        self.last = self.group
        if group is None or group != self.group:
            self.rounding, self.group = None, group

    def estimate(self) -> torch.Tensor | None:
        """Per block, the spread to size the next frame: ``value`` (unless stale for another
        group); with none, the rounding of a group that has not changed since; None: no
        estimate (the momentum rule)."""
        if self.value is not None:
            recent = self.age <= self.stale or (self.seen is not None and self.group == self.seen)
            return self.value if recent else None
        return self.rounding

    def profile(self) -> torch.Tensor | None:
        """Per block, the remembered spread whatever its age (a stale one's scale is off, its
        shape over the blocks still holds: the scaled windows rescale it), else the rounding
        :meth:`estimate` would give."""
        return self.value if self.value is not None else self.rounding

    def observe(self, d: Decoded) -> None:
        """Take the spread of a decoded frame (frames without values are ignored)."""
        if d.blocks == 0:
            return
        seen = d.spread.float()
        ok = ~torch.isnan(seen)
        if not bool(ok.any()):
            # no block decoded: the estimate is off in scale (round 1's partners start from
            # one phi, so all it saw was 8-bit coding error); x grow per round would take
            # rounds to catch up, so the next frame starts over with the momentum rule
            self.value = self.rounding = None
            return
        if d.steps is not None and d.steps.numel() == seen.numel():
            coded = ok & (seen <= RESOLUTION_STEPS * d.steps.float())
        else:
            coded = torch.zeros_like(ok)
        fresh = self.value is None or self.value.numel() != seen.numel()
        told = ok & ~coded
        if not bool(told.any()):  # a partner with our own phi (a pair met again, round 1)
            if fresh:
                self.value = None
                self.rounding = torch.full_like(seen, float(seen[ok].max()))
            return
        self.rounding = None
        self._observe_shape(d, told)
        new = self.group is None or self.group != self.last  # not the round before's partner
        if new:
            self.age = 0
        self.seen = self.group
        # a 0-dim tensor, not a float: 4x a peer's huge distance is inf, not an exception
        typical = seen[told].max()
        if fresh:  # a block seen only to the rounding: the largest seen; never seen: 4x that
            unseen = torch.where(coded, typical, 4 * typical)
            self.value = torch.where(told, seen, unseen)
            return
        old = self.value
        toward = old * self.decay if new else old  # a converging partner only widens it
        kept = torch.where(coded, old, torch.maximum(seen, toward))
        widened = torch.clamp(old * self.grow, min=typical)  # a block never seen stays open
        self.value = torch.where(ok, kept, widened)

    def _observe_shape(self, d: Decoded, told: torch.Tensor) -> None:
        """Take the frame's ``sum max**2 / sum ||diff||**2`` over the blocks beyond rounding
        into :attr:`shape` (half the old value, half the new)."""
        if d.sq is None or d.sq.numel() != told.numel():
            return
        num = float(d.spread[told].double().pow(2).sum())
        den = float(d.sq[told].double().sum())
        if not (den > 0 and math.isfinite(num) and math.isfinite(den)):
            return
        ratio = num / den
        self.shape = ratio if self.shape is None else 0.5 * (self.shape + ratio)
