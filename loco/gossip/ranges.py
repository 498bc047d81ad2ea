"""Flat-space arithmetic for gossip: range ownership (from :mod:`loco.ranges`) and splitting.

:func:`rank_range` and :func:`owners` are defined once, in :mod:`loco.ranges`, and shared with the
engine (``FlatLayout.shard_range``), so a site's gossip rank table and its engine shards agree.
"""

from __future__ import annotations

from loco.ranges import owners, rank_range

__all__ = ["owners", "rank_range", "split_range"]


def split_range(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[lo, hi)`` into at most ``parts`` contiguous non-empty pieces."""
    n = hi - lo
    parts = max(1, min(parts, n))
    return [(lo + i * n // parts, lo + (i + 1) * n // parts) for i in range(parts)]
