"""Membership of a federation: Hello to the configured peers, heartbeats, live set.

A peer is live after a successful Hello (same run id, layout hash, protocol, site name). Each
heartbeat is one Hello; a peer that misses ``dead_after`` heartbeats in a row is dead and
leaves ``live_sites()``; it rejoins on its next successful Hello. A peer that answers with a
different run or layout is dead at once (logged). Run it on rank 0 of a site and broadcast
``live_sites()`` to the other ranks at the round boundary, so all ranks pair the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

from .client import GossipClient, PeerInfo
from .errors import GossipError, PeerMismatch

log = logging.getLogger(__name__)


@dataclass
class PeerState:
    name: str
    address: str
    info: PeerInfo | None = None
    live: bool = False
    misses: int = 0
    last_error: str = ""
    seen: float = 0.0  # time.monotonic() of its last good Hello; 0.0 if never


class Membership:
    """Tracks which of the configured peer sites are live.

    Args:
        client: the rank's GossipClient (its TLS and run identity are used for Hello).
        site: this site's name (always live for itself).
        peers: ``{site name: address of its rank 0}`` (seed peers from config).
        heartbeat_s: seconds between heartbeats (background thread after ``start()``).
        dead_after: missed heartbeats before a peer is dead.
        hello_timeout_s: deadline of each heartbeat Hello.
    """

    def __init__(
        self,
        *,
        client: GossipClient,
        site: str,
        peers: dict[str, str],
        heartbeat_s: float = 5.0,
        dead_after: int = 3,
        hello_timeout_s: float = 2.0,
    ) -> None:
        if dead_after < 1:
            raise ValueError("dead_after must be >= 1")
        self.client, self.site = client, site
        self.heartbeat_s, self.dead_after, self.hello_timeout_s = (
            heartbeat_s,
            dead_after,
            hello_timeout_s,
        )
        self._peers = {n: PeerState(n, a) for n, a in peers.items() if n != site}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = futures.ThreadPoolExecutor(
            max(1, len(self._peers)), thread_name_prefix="gossip-hb"
        )

    def beat(self) -> dict[str, bool]:
        """One heartbeat round to every peer, in parallel; returns ``{name: live}``."""
        jobs = {n: self._pool.submit(self._hello, p) for n, p in self._peers.items()}
        return {n: j.result() for n, j in jobs.items()}

    def _hello(self, p: PeerState) -> bool:
        try:
            info = self.client.hello(p.address, expect_site=p.name, timeout_s=self.hello_timeout_s)
        except PeerMismatch as e:
            with self._lock:
                if p.live:
                    log.warning("peer %s left: %s", p.name, e)
                p.live, p.misses, p.last_error = False, self.dead_after, str(e)
            return False
        except GossipError as e:
            with self._lock:
                p.misses += 1
                p.last_error = str(e)
                if p.live and p.misses >= self.dead_after:
                    p.live = False
                    log.warning("peer %s dead after %d missed heartbeats: %s", p.name, p.misses, e)
                return p.live
        with self._lock:
            if not p.live:
                log.info(
                    "peer %s live (nproc %d, round %d)", p.name, info.nproc, info.current_round
                )
            p.info, p.live, p.misses, p.last_error = info, True, 0, ""
            p.seen = time.monotonic()
        return True

    def start(self) -> None:
        """Heartbeat in a daemon thread until ``stop()``; the first beat runs immediately."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gossip-heartbeat", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # noqa: BLE001 (the heartbeat thread must not die)
                log.exception("heartbeat failed")
            self._stop.wait(self.heartbeat_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.hello_timeout_s + 5)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def live_sites(self) -> list[str]:
        """Sorted names of live sites, this site included."""
        with self._lock:
            return sorted([self.site] + [n for n, p in self._peers.items() if p.live])

    def peer(self, name: str) -> PeerInfo | None:
        """Latest Hello answer of a live peer (None if dead or never seen)."""
        with self._lock:
            p = self._peers.get(name)
            return p.info if p is not None and p.live else None

    def states(self) -> dict[str, PeerState]:
        """A copy of every configured peer's state."""
        with self._lock:
            return {n: PeerState(**vars(p)) for n, p in self._peers.items()}


def wait_for_sites(node, site: str, *, late: bool, timeout_s: float,
                   say: Callable[[str], None]) -> None:  # fmt: skip
    """Wait (rank 0 of a site, at start) until every configured peer of ``node`` is live, at
    most ``timeout_s``; ``say`` tells the user how it ended. ``late``: this site resumed or
    joined past step 0, so it waits only until a live peer is under way (a member killed for
    good must not hold a restart back)."""
    want = len(node.peers) + 1
    t0 = time.monotonic()
    while len(live := node.live_sites()) < want:
        if late and any(s != site and (i := node.peer_info(s)) is not None
                        and i.current_round > 0 for s in live):  # fmt: skip
            say(f"outer: {len(live)}/{want} sites live, the run is under way; starting")
            return
        if time.monotonic() - t0 > timeout_s:
            say(f"outer: {len(node.live_sites())}/{want} sites live after {timeout_s:.0f} s; "
                "starting anyway")  # fmt: skip
            return
        time.sleep(0.1)
        node.membership.beat()  # do not wait for the next heartbeat
    say(f"outer: all {want} sites live")
