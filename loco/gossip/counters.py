"""Thread-safe gossip counters; ``record()`` gives the figures for metrics.jsonl."""

from __future__ import annotations

import threading
from collections import defaultdict

BASE_KEYS = ("bytes_sent", "bytes_recv", "pulls_ok", "pulls_failed", "pull_seconds")
MAX_PEERS = 4096  # peer names kept by the per-peer counters; others are not counted there


class GossipMetrics:
    """Monotonic counters shared by a rank's server and client.

    Keys: ``bytes_sent``, ``bytes_recv``, ``pulls_ok``, ``pulls_failed``, ``pull_seconds``,
    ``fail_<cause>`` (cause in unavailable, timeout, evicted, mismatch, auth, bad_payload,
    banned, bad_request, rpc), ``strikes``, ``bans``, ``retries``, ``served_pulls``,
    ``served_fail_<reason>``, ``hello_ok``, ``hello_failed``, ``hello_bytes`` (protobuf bytes of
    Hello requests sent and answers received).

    Per peer site (for the Status RPC; never in ``snapshot()`` nor metrics.jsonl):
    ``bytes_sent``, ``bytes_recv``, ``strikes``, ``bans``, ``banned_until``, ``paired_round``,
    ``paired_ok``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, float] = defaultdict(float)
        self._peers: dict[str, dict[str, float]] = {}

    def add(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._c[key] += value

    def add_peer(self, peer: str, key: str, value: float = 1) -> None:
        """Add ``value`` to ``key`` of ``peer`` (a site name from a checked source)."""
        with self._lock:
            if (c := self._peer(peer)) is not None:
                c[key] = c.get(key, 0.0) + value

    def set_peer(self, peer: str, key: str, value: float) -> None:
        """Set ``key`` of ``peer`` to ``value`` (the latest wins)."""
        with self._lock:
            if (c := self._peer(peer)) is not None:
                c[key] = value

    def by_peer(self) -> dict[str, dict[str, float]]:
        """A copy of the per-peer counters: ``{site: {key: value}}``."""
        with self._lock:
            return {p: dict(c) for p, c in self._peers.items()}

    def _peer(self, peer: str) -> dict[str, float] | None:
        c = self._peers.get(peer)
        if c is None and len(self._peers) < MAX_PEERS:
            c = self._peers[peer] = {}
        return c

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
