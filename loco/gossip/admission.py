"""Who may call a rank's gossip server, and how many streams each caller may hold.

:class:`Admission` is asked first by every handler: a certificate that does not name a member
is refused with PERMISSION_DENIED (counted ``served_fail_auth``), and a streaming call over a
cap of :class:`StreamSlots` is refused at once with RESOURCE_EXHAUSTED (``served_fail_busy``).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable

import grpc

from .counters import GossipMetrics
from .tls import TlsConfig, peer_site

log = logging.getLogger(__name__)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (brackets allowed); False for anything else,
    including an empty host, 0.0.0.0, :: and every other name (it may resolve anywhere)."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def peer_host(peer: str) -> str:
    """Host of a gRPC ``context.peer()`` string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] if rest.count(":") else rest
    return host or peer


class StreamSlots:
    """Streaming RPCs in flight, per peer and in total. ``acquire`` never blocks."""

    def __init__(self, total: int, per_peer: int) -> None:
        if total < 1 or per_peer < 1:
            raise ValueError(f"stream caps must be >= 1, got total={total} per_peer={per_peer}")
        self.total, self.per_peer = total, per_peer
        self._lock = threading.Lock()
        self._n = 0
        self._by_peer: dict[str, int] = {}

    def acquire(self, peer: str) -> Callable[[], None] | str:
        """A release function (idempotent) for a new slot of ``peer``, or why there is none."""
        with self._lock:
            held = self._by_peer.get(peer, 0)
            if held >= self.per_peer:
                return f"{peer} already holds {held} streams (max_streams_per_peer)"
            if self._n >= self.total:
                return f"server holds {self._n} streams (max_streams)"
            self._n += 1
            self._by_peer[peer] = held + 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                self._n -= 1
                left = self._by_peer[peer] - 1
                if left:
                    self._by_peer[peer] = left
                else:
                    del self._by_peer[peer]

        return release

    def held(self, peer: str | None = None) -> int:
        """Slots in use by ``peer``, or in total."""
        with self._lock:
            return self._n if peer is None else self._by_peer.get(peer, 0)


class Admission:
    """The checks every RPC of one rank's server passes before it does any work.

    Args:
        tls: the server's mTLS material; None in plaintext, where nobody is authenticated.
        members: site names allowed to call (checked against the peer certificate); None = any
            certificate of the run CA.
        slots: the stream caps.
        metrics: where refusals are counted.
    """

    def __init__(
        self,
        *,
        tls: TlsConfig | None,
        members: set[str] | None,
        slots: StreamSlots,
        metrics: GossipMetrics,
    ) -> None:
        self.tls, self.members, self.slots, self.metrics = tls, members, slots, metrics

    def authorize(self, context: grpc.ServicerContext) -> str:
        """The caller's site ('' in plaintext); aborts PERMISSION_DENIED for a non-member."""
        if self.tls is None:
            return ""
        site = peer_site(context)
        if site is None or (self.members is not None and site not in self.members):
            self.metrics.add("served_fail_auth")
            log.warning("refused peer %s (site %r not a member)", context.peer(), site)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"site {site!r} is not a member")
        return site

    def hold(self, context: grpc.ServicerContext, site: str) -> Callable[[], None]:
        """A stream slot of the caller (its site, or in plaintext its host), released when the
        RPC ends; aborts RESOURCE_EXHAUSTED at once when a cap is full."""
        got = self.slots.acquire(site or peer_host(context.peer()))
        if isinstance(got, str):
            self.metrics.add("served_fail_busy")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"busy: {got}; retry later")
        context.add_callback(got)  # backstop: the handler's own finally releases it first
        return got

    def caller(self, site: str, claimed: str) -> str:
        """The member name to count a call's traffic under: the authenticated ``site``, or in
        plaintext the request's ``claimed`` site when it is a configured member; else ''."""
        if site:
            return site
        return claimed if self.members is not None and claimed in self.members else ""
