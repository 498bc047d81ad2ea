"""Thread-safe gossip counters; ``record()`` gives the figures for metrics.jsonl."""

from __future__ import annotations

import threading
from collections import defaultdict

BASE_KEYS = ("bytes_sent", "bytes_recv", "pulls_ok", "pulls_failed", "pull_seconds")


class GossipMetrics:
    """Monotonic counters shared by a rank's server and client.

    Keys: ``bytes_sent``, ``bytes_recv``, ``pulls_ok``, ``pulls_failed``, ``pull_seconds``,
    ``fail_<cause>`` (cause in unavailable, timeout, evicted, mismatch, auth, bad_payload,
    banned, bad_request, rpc), ``strikes``, ``bans``, ``retries``, ``served_pulls``,
    ``served_fail_<reason>``, ``hello_ok``, ``hello_failed``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, float] = defaultdict(float)

    def add(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._c[key] += value

    def snapshot(self) -> dict[str, float]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._c)

    @staticmethod
    def delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
        """Counters accumulated between two snapshots (e.g. over one round)."""
        return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}

    @staticmethod
    def record(counters: dict[str, float]) -> dict[str, float]:
        """Flat figures for a metrics.jsonl line: the counters plus ``pull_mb_s``; the base keys
        (bytes_sent, bytes_recv, pulls_ok, pulls_failed, pull_seconds) are always present."""
        out = dict.fromkeys(BASE_KEYS, 0.0)
        out.update(counters)
        secs = counters.get("pull_seconds", 0.0)
        out["pull_mb_s"] = counters.get("bytes_recv", 0.0) / secs / 1e6 if secs > 0 else 0.0
        return out
