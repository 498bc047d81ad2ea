"""The simulated network: per-site latency and bandwidth, and all-reduce times on it.

Each site draws an access latency and a bandwidth (lognormal); a link's one-way latency is the
sum of its ends' latencies and its bandwidth the smaller of its ends' (the slower access link
is the bottleneck). The ring and tree all-reduce times use the same draws as NoLoCo's pulls.
"""

from __future__ import annotations

import math

import numpy as np


class LinkModel:
    """Latency (s) and bandwidth (bytes/s) of every site pair, from per-site draws."""

    def __init__(self, n: int, *, rng: np.random.Generator, lat_ms: float, lat_sigma: float,
                 bw_gbps: float, bw_sigma: float) -> None:  # fmt: skip
        self.n = n
        self.lat = (lat_ms / 1e3) / 2 * rng.lognormal(0.0, lat_sigma, n)
        self.bw = bw_gbps * 1e9 / 8 * rng.lognormal(0.0, bw_sigma, n)

    def latency(self, a: int, b: int) -> float:
        return float(self.lat[a] + self.lat[b])

    def bandwidth(self, a: int, b: int) -> float:
        return float(min(self.bw[a], self.bw[b]))

    def transfer(self, a: int, b: int, nbytes: float) -> float:
        """Seconds for ``nbytes`` from a to b: latency + size / bandwidth."""
        return self.latency(a, b) + nbytes / self.bandwidth(a, b)


def ring_allreduce_s(links: LinkModel, members: list[int], nbytes: float) -> float:
    """Ring all-reduce (reduce-scatter + all-gather): 2(n-1) lock-step steps, each moving
    ``nbytes / n`` over every ring link; a step lasts as long as the slowest link."""
    n = len(members)
    if n < 2:
        return 0.0
    a = np.asarray(members)
    b = np.roll(a, -1)
    step = links.lat[a] + links.lat[b] + (nbytes / n) / np.minimum(links.bw[a], links.bw[b])
    return float(2 * (n - 1) * step.max())


def tree_allreduce_s(links: LinkModel, members: list[int], nbytes: float) -> float:
    """Binary-tree all-reduce: reduce to the root level by level, then broadcast back; each
    level moves the whole ``nbytes`` over its edges and lasts as long as its slowest edge."""
    n = len(members)
    total = 0.0
    for level in range(math.ceil(math.log2(n)) if n > 1 else 0):
        span = 1 << level
        worst = 0.0
        for i in range(0, n - span, 2 * span):  # child i + span -> parent i
            worst = max(worst, links.transfer(members[i + span], members[i], nbytes))
        total += worst
    return 2 * total
