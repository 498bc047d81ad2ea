"""Membership by SWIM over UDP, a drop-in for the all-to-all :class:`Membership`.

Same interface (``live_sites``, ``peer``, ``states``, ``beat``, ``start``, ``stop``), O(1)
datagrams per site per period instead of a Hello to every peer. Each configured peer's SWIM
address is its gRPC address (``host:port``) with the same port number over UDP. ``peer(name)``
says Hello to a live member on demand and caches the answer while it stays live, so the run,
layout and site checks of the heartbeat still apply, but only to the sites this one pulls from;
a member whose Hello answers with another run or layout is never live again. A configured
peer is live only once heard from (SWIM without ``trust_seeds``), so a site waiting for every
member at its start waits for members that really run.

Datagrams carry the run key (``key``, insecure runs) or, under mTLS, pairwise site keys
(``keys``, :mod:`loco.gossip.swim_keys`) fetched from each sender over the ``Swim.Key`` RPC
(:class:`~loco.gossip.swim_key_service.KeyFetcher`): at start from every configured peer, and
again, at most once per period, when a peer's datagram arrives under a key this site lacks.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from .client import GossipClient, PeerInfo
from .errors import GossipError, PeerMismatch
from .membership import PeerState
from .server import split_address
from .swim import SwimOptions
from .swim_key_service import KeyFetcher
from .swim_keys import PairKeys
from .swim_udp import UdpSwim

log = logging.getLogger(__name__)


class SwimMembership:
    """Tracks the live members by SWIM; see the module docstring.

    Args:
        client: the rank's GossipClient (for the on-demand Hello).
        site, peers: this site's name and ``{site name: gRPC address of its rank 0}``.
        udp_listen: ``host:port`` this member's SWIM socket binds (port 0: any).
        key: the run's datagram key (>= 16 bytes, the same at every member; insecure runs).
        keys: this site's pairwise keys instead (mTLS runs; its server answers ``Swim.Key``
            with ``keys.key_for``).
        options: SWIM timing; hello_timeout_s: deadline of the on-demand Hello.
        incarnation: above the previous life's (e.g. the start time in ms) after a restart.
    """

    def __init__(self, *, client: GossipClient, site: str, peers: dict[str, str],
                 udp_listen: str, key: bytes = b"", keys: PairKeys | None = None,
                 options: SwimOptions | None = None,
                 hello_timeout_s: float = 2.0, seed: int = 0,
                 incarnation: int = 0) -> None:  # fmt: skip
        self.client, self.site, self.hello_timeout_s = client, site, hello_timeout_s
        self.peers = {n: a for n, a in peers.items() if n != site}
        book = {n: split_address(a) for n, a in self.peers.items()}
        self.fetcher: KeyFetcher | None = None
        if keys is not None:
            period = (options or SwimOptions()).period_s
            self.fetcher = KeyFetcher(client=client, keys=keys, addresses=self.peers,
                                      timeout_s=hello_timeout_s, min_interval_s=period)  # fmt: skip
            keys.on_unkeyed = self.fetcher.want
        self.udp = UdpSwim(site=site, address=split_address(udp_listen), book=book, key=key,
                           auth=keys, options=options, seed=seed, incarnation=incarnation,
                           trust_seeds=False)  # fmt: skip
        self._lock = threading.Lock()
        # Hello answers with their time: asked again after a period (``current_round`` moves;
        # a late site waits for a peer under way by it)
        self._infos: dict[str, tuple[PeerInfo, float]] = {}
        self.info_max_age_s = (options or SwimOptions()).period_s
        self._errors: dict[str, str] = {}
        self._refused: set[str] = set()

    def start(self) -> None:
        if self.fetcher is not None:
            self.fetcher.start()
            for name in self.peers:
                self.fetcher.want(name)
        self.udp.start()

    def stop(self) -> None:
        self.udp.stop()
        if self.fetcher is not None:
            self.fetcher.stop()

    def beat(self) -> dict[str, bool]:
        """SWIM runs continuously; this only reports ``{name: live}``."""
        live = set(self.live_sites())
        return {n: n in live for n in self.peers}

    def live_sites(self) -> list[str]:
        """Sorted names of live configured sites (SWIM view, refused ones out), self included."""
        view = set(self.udp.live())
        with self._lock:
            ok = {n for n in self.peers if n in view and n not in self._refused}
        return sorted(ok | {self.site})

    def peer(self, name: str) -> PeerInfo | None:
        """Hello answer of a live peer (at most ``info_max_age_s`` old while the peer answers);
        None if dead or refused."""
        if name not in self.live_sites():
            with self._lock:
                self._infos.pop(name, None)
            return None
        with self._lock:
            info, at = self._infos.get(name, (None, 0.0))
        if info is not None and time.monotonic() - at <= self.info_max_age_s:
            return info
        try:
            info = self.client.hello(self.peers[name], expect_site=name,
                                     timeout_s=self.hello_timeout_s)  # fmt: skip
        except PeerMismatch as e:
            log.warning("peer %s refused: %s", name, e)
            with self._lock:
                self._refused.add(name)
                self._errors[name] = str(e)
            return None
        except GossipError as e:
            with self._lock:
                self._errors[name] = str(e)
            return info  # SWIM still has it live: the previous answer, if any
        with self._lock:
            self._infos[name] = (info, time.monotonic())
            self._errors.pop(name, None)
        return info

    def states(self) -> dict[str, PeerState]:
        """Every configured peer's state as the Status RPC reports it."""
        live = set(self.live_sites())
        now = time.monotonic()
        with self._lock:
            return {
                n: PeerState(n, a, info=self._infos.get(n, (None,))[0], live=n in live,
                             last_error=self._errors.get(n, ""), seen=now if n in live else 0.0)
                for n, a in self.peers.items()
            }  # fmt: skip


def swim_key(run_id: str, layout_hash: str) -> bytes:
    """The datagram key of an insecure run. Derived from the run id and layout, so it keeps out
    strays and other runs but is no secret (mTLS runs use pairwise keys, :class:`PairKeys`)."""
    return hashlib.sha256(f"loco-swim/{run_id}/{layout_hash}".encode()).digest()


def swim_membership(client: GossipClient, site: str, peers: dict[str, str], address: str, *,
                    heartbeat_s: float, hello_timeout_s: float, seed: int,
                    key: bytes = b"", keys: PairKeys | None = None) -> SwimMembership:  # fmt: skip
    """A node's SWIM membership: one period per ``heartbeat_s``, UDP on ``address``'s port,
    incarnation = the start time in ms (a restart comes back above its previous life)."""
    opts = SwimOptions(period_s=heartbeat_s, ack_timeout_s=0.4 * heartbeat_s)
    return SwimMembership(client=client, site=site, peers=peers, udp_listen=address, key=key,
                          keys=keys, options=opts, hello_timeout_s=hello_timeout_s, seed=seed,
                          incarnation=int(time.time() * 1000))  # fmt: skip
