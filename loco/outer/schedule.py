"""When the outer loop acts: rounds every ``H`` inner steps, overlap ``tau``, the last step.

Round ``t`` has its boundary at inner step ``t * H``. With overlap (``tau > 0``) a round is
merged ``tau`` inner steps after its boundary, except that the last step always merges (and its
own boundary, if any, blocks). After the last step the final average runs (when enabled); it
uses round ``last // H + 1``, which is never a regular round.
"""

from __future__ import annotations

from dataclasses import dataclass

SETTLE_S = 1.0  # at the end: quiet time (no pull served) before the node may close


@dataclass(frozen=True)
class Schedule:
    """The outer loop's timetable. Raises ValueError unless ``H >= 1`` and ``0 <= tau < H``.

    Args:
        H: inner steps per round.
        steps: the run's last inner step.
        tau: overlap in inner steps (0: every round blocks).
        final_average: run the final average after the last step.
    """

    H: int
    steps: int
    tau: int = 0
    final_average: bool = False

    def __post_init__(self) -> None:
        if self.H < 1:
            raise ValueError(f"outer.H={self.H} must be >= 1")
        if not 0 <= self.tau < self.H:
            raise ValueError(f"outer.tau={self.tau} must be in [0, outer.H) = [0, {self.H})")

    def merge_due(self, boundary_step: int, done: int) -> bool:
        """A round whose boundary was at ``boundary_step`` must merge after step ``done``."""
        return done >= boundary_step + self.tau or done >= self.steps

    def round_at(self, done: int) -> int | None:
        """The round whose boundary is inner step ``done``, or None."""
        return done // self.H if done % self.H == 0 else None

    def overlaps(self, done: int) -> bool:
        """The round of the boundary at step ``done`` runs in the background."""
        return self.tau > 0 and done < self.steps

    def final_due(self, done: int) -> bool:
        """The final average runs after step ``done``."""
        return done == self.steps and self.final_average

    def final_round(self, done: int) -> int:
        """The round number of the final average after step ``done`` (never a regular one)."""
        return done // self.H + 1


def expected_pulls(last_partners: list[str] | None, all_live: bool, final_peers: int | None) -> int:
    """How many pulls of this rank the partners owe at the end: two streams (delta, phi; DiLoCo
    one) per partner of the last round, plus one per peer of the final average. It counts
    partners, not their ranks' pulls (a partner with more ranks pulls more than once)."""
    want = (1 if all_live else 2) * len(last_partners) if last_partners else 0
    return want + (final_peers or 0)
