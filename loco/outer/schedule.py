"""When the outer loop acts: syncs every ``H / F`` inner steps, overlap ``tau``, the last step.

Without fragments (``F = 1``) round ``t`` has its boundary at inner step ``t * H``. With
``F`` streaming fragments (``loco.outer.fragments``) a sync happens every ``stride = H / F``
inner steps: sync ``j`` (``j >= 1``) at step ``j * stride`` is fragment ``(j - 1) % F`` of round
``(j + F - 1) // F``, so round ``t``'s fragments sync at ``(t - 1) * H + (f + 1) * stride`` and
its last one at ``t * H``, the step of a whole round. ``j`` is the sync's gossip round id
(publish, pull, pairing), unique per (round, fragment); with ``F = 1`` it is ``t``.

With overlap (``tau > 0``) a sync is merged ``tau`` inner steps after its boundary, except that
the last step always merges (and its own boundary, if any, blocks). ``tau < stride``: at most one
sync is in flight, and every stride has ``stride - tau`` steps with none (checkpoints). After
the last step the final average runs (when enabled) as id ``last // stride + 1``, never a
regular sync.
"""

from __future__ import annotations

from dataclasses import dataclass

SETTLE_S = 1.0  # at the end: quiet time (no pull served) before the node may close


@dataclass(frozen=True)
class Schedule:
    """The outer loop's timetable. Raises ValueError unless ``H >= 1``, ``F >= 1`` divides
    ``H`` and ``0 <= tau < H / F``.

    Args:
        H: inner steps per round.
        steps: the run's last inner step.
        tau: overlap of one sync in inner steps (0: every sync blocks).
        final_average: run the final average after the last step.
        fragments: ``F``, streaming fragments synced on staggered steps (1: whole rounds).
    """

    H: int
    steps: int
    tau: int = 0
    final_average: bool = False
    fragments: int = 1

    def __post_init__(self) -> None:
        if self.H < 1:
            raise ValueError(f"outer.H={self.H} must be >= 1")
        if self.fragments < 1 or self.H % self.fragments:
            raise ValueError(f"outer.fragments={self.fragments} must be >= 1 and divide "
                             f"outer.H={self.H}")  # fmt: skip
        if self.fragments == 1 and not 0 <= self.tau < self.H:
            raise ValueError(f"outer.tau={self.tau} must be in [0, outer.H) = [0, {self.H})")
        if not 0 <= self.tau < self.stride:
            raise ValueError(f"outer.fragment_tau={self.tau} must be in [0, outer.H / "
                             f"outer.fragments) = [0, {self.stride})")  # fmt: skip

    @classmethod
    def make(cls, *, H: int, steps: int, tau: int, final_average: bool, fragments: int,
             fragment_tau: int | None) -> Schedule:  # fmt: skip
        """The timetable of ``outer.*``: ``tau`` overlaps whole rounds (``fragments = 1``);
        with fragments ``fragment_tau`` overlaps a sync (None: ``H / F - 1``, the most allowed)
        and ``tau`` must be 0."""
        if fragments == 1:
            return cls(H=H, steps=steps, tau=tau, final_average=final_average)
        if tau:
            raise ValueError(f"outer.tau={tau} overlaps whole rounds; with outer.fragments="
                             f"{fragments} set outer.tau=0 and outer.fragment_tau")  # fmt: skip
        if fragment_tau is None:
            fragment_tau = max(0, H // max(1, fragments) - 1)
        return cls(H=H, steps=steps, tau=fragment_tau, final_average=final_average,
                   fragments=fragments)  # fmt: skip

    @property
    def stride(self) -> int:
        """Inner steps between two syncs (``H / F``)."""
        return self.H // self.fragments

    def merge_due(self, boundary_step: int, done: int) -> bool:
        """A sync whose boundary was at ``boundary_step`` must merge after step ``done``."""
        return done >= boundary_step + self.tau or done >= self.steps

    def round_at(self, done: int) -> int | None:
        """The sync id ``j`` whose boundary is inner step ``done`` (the round with ``F = 1``),
        or None."""
        return done // self.stride if done % self.stride == 0 else None

    def round_of(self, j: int) -> int:
        """The round ``t`` of sync ``j``."""
        return (j + self.fragments - 1) // self.fragments

    def fragment_of(self, j: int) -> int:
        """The fragment ``f`` of sync ``j``."""
        return (j - 1) % self.fragments

    def overlaps(self, done: int) -> bool:
        """The sync of the boundary at step ``done`` runs in the background."""
        return self.tau > 0 and done < self.steps

    def final_due(self, done: int) -> bool:
        """The final average runs after step ``done``."""
        return done == self.steps and self.final_average

    def final_round(self, done: int) -> int:
        """The gossip round id of the final average after step ``done`` (never a sync's)."""
        return done // self.stride + 1


def expected_pulls(last_partners: list[str] | None, all_live: bool, final_peers: int | None) -> int:
    """How many pulls of this rank the partners owe at the end: two streams (delta, phi; DiLoCo
    one) per partner of the last round, plus one per peer of the final average. It counts
    partners, not their ranks' pulls (a partner with more ranks pulls more than once)."""
    want = (1 if all_live else 2) * len(last_partners) if last_partners else 0
    return want + (final_peers or 0)
