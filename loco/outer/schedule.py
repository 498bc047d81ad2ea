"""When the outer loop acts: round boundaries (every ``H`` steps, after the first rounds'
own lengths), syncs every ``L / F`` inner steps of a round, overlap ``tau``, the last step.

Round ``t`` (``t >= 1``) is ``L_t`` inner steps long: ``L_t = first[t - 1]`` for the first
``len(first)`` rounds (``outer.H_first``), then ``L_t = H``. Its boundary is
``end(t) = L_1 + ... + L_t`` (``t * H`` without first rounds). Everything is a function of the
configuration and the step, so every site, a resumed run and a joiner agree on it.

Without fragments (``F = 1``) round ``t`` syncs at ``end(t)``. With ``F`` streaming fragments
(``loco.outer.fragments``; every ``L_t`` a multiple of ``F``) round ``t``'s fragment ``f`` syncs at
``end(t - 1) + (f + 1) * L_t / F``, its last one at ``end(t)``. Sync ``j = (t - 1) * F + f + 1``
is the gossip round id (publish, pull, pairing), unique per (round, fragment); with ``F = 1``
it is ``t``.

With overlap (``tau > 0``) a sync is merged ``tau`` inner steps after its boundary, except that
the last step always merges (and its own boundary, if any, blocks). ``tau`` is below the shortest
stride ``L_t / F``: at most one sync is in flight, and every stride has steps with none
(checkpoints). After the last step the final average runs (when enabled) as the id after the
last sync's, never a regular sync.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

SETTLE_S = 1.0  # at the end: quiet time (no pull served) before the node may close
MAX_FIRST_ROUNDS = 10_000  # outer.H_first entries: more is a config mistake


@dataclass(frozen=True)
class Schedule:
    """The outer loop's timetable. Raises ValueError unless ``H >= 1``, every first round's length
    ``>= 1``, ``F >= 1`` divides every round length and ``0 <= tau <`` the shortest stride.

    Args:
        H: inner steps per round (after the first rounds).
        steps: the run's last inner step.
        tau: overlap of one sync in inner steps (0: every sync blocks).
        final_average: run the final average after the last step.
        fragments: ``F``, streaming fragments synced on staggered steps (1: whole rounds).
        first: the lengths of the first rounds (``outer.H_first``; empty: every round is H).
    """

    H: int
    steps: int
    tau: int = 0
    final_average: bool = False
    fragments: int = 1
    first: tuple[int, ...] = ()
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", tuple(self.first))
        check_lengths(self.H, self.first, self.fragments)
        object.__setattr__(self, "_ends", tuple(accumulate(self.first)))
        lo = self.min_stride
        rnd = "outer.H" if lo == self.stride else "the shortest round of outer.H_first"
        if self.fragments == 1 and not 0 <= self.tau < lo:
            raise ValueError(f"outer.tau={self.tau} must be in [0, {rnd}) = [0, {lo})")
        if not 0 <= self.tau < lo:
            raise ValueError(f"outer.fragment_tau={self.tau} must be in [0, {rnd} / "
                             f"outer.fragments) = [0, {lo})")  # fmt: skip

    @classmethod
    def make(cls, *, H: int, steps: int, tau: int, final_average: bool, fragments: int,
             fragment_tau: int | None, first: tuple[int, ...] = ()) -> Schedule:  # fmt: skip
        """The timetable of ``outer.*``: ``tau`` overlaps whole rounds (``fragments = 1``);
        with fragments ``fragment_tau`` overlaps a sync (None: the shortest stride - 1, the
        most allowed) and ``tau`` must be 0."""
        if fragments == 1:
            return cls(H=H, steps=steps, tau=tau, final_average=final_average, first=first)
        if tau:
            raise ValueError(f"outer.tau={tau} overlaps whole rounds; with outer.fragments="
                             f"{fragments} set outer.tau=0 and outer.fragment_tau")  # fmt: skip
        if fragment_tau is None:
            fragment_tau = max(0, min((H, *first)) // max(1, fragments) - 1)
        return cls(H=H, steps=steps, tau=fragment_tau, final_average=final_average,
                   fragments=fragments, first=first)  # fmt: skip

    @property
    def stride(self) -> int:
        """Inner steps between two syncs after the first rounds (``H / F``)."""
        return self.H // self.fragments

    @property
    def min_stride(self) -> int:
        """The fewest inner steps between two syncs of the run (first rounds included)."""
        return min((self.H, *self.first)) // self.fragments

    # ------------------------------------------------------------------ rounds and steps

    def length(self, t: int) -> int:
        """``L_t``, the inner steps of round ``t >= 1``."""
        return self.first[t - 1] if t <= len(self.first) else self.H

    def end(self, t: int) -> int:
        """The boundary step of round ``t >= 0`` (0 for ``t = 0``): what a joiner adopting
        round ``t``'s state starts at."""
        w = len(self.first)
        if t <= w:
            return self._ends[t - 1] if t > 0 else 0
        return (self._ends[-1] if w else 0) + (t - w) * self.H

    def rounds_done(self, step: int) -> int:
        """How many rounds have their boundary at or before inner ``step``."""
        w = len(self.first)
        if w and step < self._ends[-1]:
            return bisect_right(self._ends, step)
        return w + (step - (self._ends[-1] if w else 0)) // self.H

    def syncs_done(self, step: int) -> int:
        """How many syncs (fragments' included) have their boundary at or before ``step``."""
        t = self.rounds_done(step)
        part = (step - self.end(t)) // (self.length(t + 1) // self.fragments)
        return t * self.fragments + part

    def sync_step(self, j: int) -> int:
        """The boundary step of sync ``j >= 1``."""
        t, f = self.round_of(j), self.fragment_of(j)
        return self.end(t - 1) + (f + 1) * (self.length(t) // self.fragments)

    def round_at(self, done: int) -> int | None:
        """The sync id ``j`` whose boundary is inner step ``done`` (the round with ``F = 1``),
        or None."""
        if done < 1:
            return None
        j = self.syncs_done(done)
        return j if j > self.syncs_done(done - 1) else None

    def round_of(self, j: int) -> int:
        """The round ``t`` of sync ``j``."""
        return (j + self.fragments - 1) // self.fragments

    def fragment_of(self, j: int) -> int:
        """The fragment ``f`` of sync ``j``."""
        return (j - 1) % self.fragments

    # ------------------------------------------------------------------ overlap and the end

    def merge_due(self, boundary_step: int, done: int) -> bool:
        """A sync whose boundary was at ``boundary_step`` must merge after step ``done``."""
        return done >= boundary_step + self.tau or done >= self.steps

    def overlaps(self, done: int) -> bool:
        """The sync of the boundary at step ``done`` runs in the background."""
        return self.tau > 0 and done < self.steps

    def final_due(self, done: int) -> bool:
        """The final average runs after step ``done``."""
        return done == self.steps and self.final_average

    def tails(self, done: int) -> list[int]:
        """The fragments whose last sync's boundary is before step ``done``: their inner
        progress since it has not had an outer step (with ``F = 1``: ``[0]``, the whole space,
        when ``done`` is not a round's boundary; else none)."""
        j = self.syncs_done(done)
        at_done = self.fragment_of(j) if j >= 1 and self.sync_step(j) == done else None
        return [f for f in range(self.fragments) if f != at_done]

    def final_round(self, done: int) -> int:
        """The gossip round id of the final average after step ``done`` (never a sync's)."""
        return self.syncs_done(done) + 1


def check_lengths(H: int, first: tuple[int, ...], fragments: int) -> None:
    """Raise ValueError (one line naming the fix) unless ``H`` and every first round's length
    are ``>= 1`` and multiples of ``fragments >= 1``, with at most MAX_FIRST_ROUNDS of them."""
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"outer.H={H!r} must be an integer >= 1")
    if len(first) > MAX_FIRST_ROUNDS:
        raise ValueError(f"outer.H_first has {len(first)} rounds; give at most "
                         f"{MAX_FIRST_ROUNDS} (the later rounds are outer.H long)")  # fmt: skip
    bad = [x for x in first if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad:
        raise ValueError(f"outer.H_first={list(first)}: every round length must be an integer "
                         f">= 1 (not {bad[0]!r})")  # fmt: skip
    if not isinstance(fragments, int) or fragments < 1:
        raise ValueError(f"outer.fragments={fragments!r} must be an integer >= 1")
    if H % fragments:
        raise ValueError(f"outer.fragments={fragments} must divide outer.H={H}")
    if odd := [x for x in first if x % fragments]:
        raise ValueError(f"outer.fragments={fragments} must divide every outer.H_first round "
                         f"length (not {odd[0]}): a fragment syncs every length / fragments "
                         "steps")  # fmt: skip


def expected_pulls(last_partners: list[str] | None, all_live: bool, final_pulls: int | None,
                   sends_delta: bool = True) -> int:  # fmt: skip
    """How many pulls of this rank the partners owe at the end: two streams (delta, phi; DiLoCo
    one; a method that sends no delta one) per partner of the last round, plus ``final_pulls``,
    what the final average's peers owe (its frame per peer, and its sketch before a lattice
    frame). It counts partners, not their ranks' pulls (a partner with more ranks pulls more
    than once)."""
    streams = 1 if all_live or not sends_delta else 2
    want = streams * len(last_partners) if last_partners else 0
    return want + (final_pulls or 0)


@dataclass(frozen=True)
class Meetings:
    """Which NoLoCo rounds pair the sites up (``outer.meet_first``, ``outer.meet_every``):
    each of the first ``first`` rounds, then every ``every``-th, counted back from the run's
    ``last`` round (``last``, ``last - every``, ... down to after ``first``), so the last round
    is a meeting and the final average starts from landed pairs. ``last`` 0 (not known): every
    ``every``-th from ``first + 1``. In the other rounds each site takes its outer step alone.
    ``index(t)`` numbers the meetings 1, 2, 3, ... (the landing's leader rotates with it, so a
    pair's lead alternates whatever ``every`` is); with ``every`` 1 it is ``t``."""

    every: int = 1
    first: int = 0
    last: int = 0

    def __post_init__(self) -> None:
        for key, v, lo in (("meet_every", self.every, 1), ("meet_first", self.first, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"outer.{key}={v!r} must be a whole number >= {lo}")
        if isinstance(self.last, bool) or not isinstance(self.last, int) or self.last < 0:
            raise ValueError(f"the last round {self.last!r} must be a whole number >= 0")

    @property
    def start(self) -> int:
        """The first meeting after the first ``first`` rounds."""
        if self.last <= self.first:
            return self.first + 1
        return self.first + 1 + (self.last - self.first - 1) % self.every

    def meets(self, t: int) -> bool:
        """Whether round ``t`` (``>= 1``) pairs the sites up."""
        return t <= self.first or (t >= self.start and (t - self.start) % self.every == 0)

    def final(self, k: int) -> frozenset[int]:
        """The rounds of the run's last ``k`` meetings (empty while ``last`` is not known)."""
        out: list[int] = []
        t = self.last
        while t >= 1 and len(out) < k:
            if self.meets(t):
                out.append(t)
            t -= 1
        return frozenset(out)

    def index(self, t: int) -> int:
        """The number of the meeting at round ``t`` (of the last one before it otherwise)."""
        if t <= self.first:
            return t
        if t < self.start:
            return self.first
        return self.first + 1 + (t - self.start) // self.every
