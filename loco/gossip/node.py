"""One rank's view of the gossip layer: its server, its client and (on rank 0) membership.

This is what the outer loop calls. Per NoLoCo round t::

    mine = node.propose(t, live)                        # every rank, rank 0's live view
    node.publish(t, "delta", delta_payload)             # this rank's range, before pulling
    got = node.exchange(mine)                           # the partners' proposals; no collective
    node.settle(t, got.group)                           # this rank's gate opens to the group
    for partner in got.partners:                        # the settled group, less this site
        res = node.pull(partner, t, "delta")            # this rank's own range [lo, hi)
        if not res.ok: ...                              # local round (n = 1); res.cause counted

(``node.partners(t, live)`` is the message-free pairing, without the agreement.)

Pulls never raise for remote failures (see :class:`~loco.gossip.client.PullResult`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ._pb import gossip_pb2 as pb
from .agree_rpc import Settled, exchange, propose_round
from .agreement import MAX_GROUP, Proposal
from .client import GossipClient, PeerInfo, PullResult, Validator
from .counters import GossipMetrics
from .errors import GossipError, PeerUnavailable
from .membership import Membership
from .options import GossipOptions
from .pairing import partners
from .rank_address import rank_listen
from .server import GossipServer
from .status import member_status
from .swim_keys import PairKeys
from .swim_membership import SwimMembership, swim_key, swim_membership
from .tls import TlsConfig


class GossipNode:
    """Server + client (+ membership when ``heartbeat`` is True) of one rank.

    Args:
        site, rank, nproc, flat_size, run_id, layout_hash: identity and layout.
        listen: the site's ``host:port``; rank r binds port + r of that host (port 0: any free
            port), then give Hello every rank's real address via ``server.set_rank_addresses``.
        bind: this rank's own ``host:port`` instead (a site on several machines:
            loco.gossip.rank_address.rank_binds).
        peers: ``{site: rank-0 address}`` of the other sites (seed peers).
        seed, odd: pairing seed and odd-count policy ("triple" or "sit_out").
        pairing: ``random`` matchings or ``hypercube`` (``loco.gossip.pairing``).
        heartbeat: run the membership heartbeats here (rank 0 of each site).
        tls / cert_dir (this site's bundle ``DIR/<site>`` of ``python -m loco.certs``) / insecure, pull_timeout_s, hello_timeout_s, heartbeat_s, dead_after, strikes,
        ban_rounds, parallel_streams, chunk_bytes, keep_rounds, backoff_s, backoff_max_s, max_retries,
        keepalive_s, max_wait_s, max_streams, max_streams_per_peer, validate: see GossipServer,
        GossipClient and Membership.
        insecure_public: with ``insecure``, allow plaintext on a non-loopback ``listen``
            (GossipServer's ``allow_public_plaintext``); otherwise that is a ValueError.
    """

    def __init__(
        self,
        *,
        site: str,
        rank: int,
        nproc: int,
        flat_size: int,
        run_id: str,
        layout_hash: str,
        listen: str,
        peers: dict[str, str],
        bind: str = "",
        seed: int = 0,
        odd: str = GossipOptions.odd,
        pairing: str = GossipOptions.pairing,
        heartbeat: bool | None = None,
        tls: TlsConfig | None = None,
        cert_dir: str | None = GossipOptions.cert_dir,
        insecure: bool = GossipOptions.insecure,
        pull_timeout_s: float = GossipOptions.pull_timeout_s,
        hello_timeout_s: float = GossipOptions.hello_timeout_s,
        heartbeat_s: float = GossipOptions.heartbeat_s,
        dead_after: int = GossipOptions.dead_after,
        strikes: int = GossipOptions.strikes,
        ban_rounds: int = GossipOptions.ban_rounds,
        parallel_streams: int = GossipOptions.parallel_streams,
        chunk_bytes: int = GossipOptions.chunk_bytes,
        keep_rounds: int = GossipOptions.keep_rounds,
        backoff_s: float = GossipOptions.backoff_s,
        backoff_max_s: float = GossipOptions.backoff_max_s,
        max_retries: int = GossipOptions.max_retries,
        keepalive_s: float = GossipOptions.keepalive_s,
        max_wait_s: float = GossipOptions.max_wait_s,
        max_streams: int = GossipOptions.max_streams,
        max_streams_per_peer: int = GossipOptions.max_streams_per_peer,
        insecure_public: bool = GossipOptions.insecure_public,
        membership: str = GossipOptions.membership,
        validate: Validator | None = None,
    ) -> None:
        if tls is None and cert_dir and not insecure:
            tls = TlsConfig.for_site(cert_dir, site)
        self.site, self.rank, self.seed, self.odd = site, rank, seed, odd
        self.pairing = pairing
        self.metrics = GossipMetrics()
        members = sorted(set(peers) | {site})
        self.server = GossipServer(
            site=site, rank=rank, nproc=nproc, flat_size=flat_size, run_id=run_id,
            layout_hash=layout_hash, listen=bind or rank_listen(listen, rank), tls=tls, insecure=insecure,
            members=members, chunk_bytes=chunk_bytes, keep_rounds=keep_rounds, metrics=self.metrics,
            keepalive_s=keepalive_s, max_wait_s=max_wait_s, max_streams=max_streams,
            max_streams_per_peer=max_streams_per_peer, allow_public_plaintext=insecure_public,
        )  # fmt: skip
        self.client = GossipClient(
            site=site, run_id=run_id, layout_hash=layout_hash, tls=tls, insecure=insecure,
            timeout_s=pull_timeout_s, hello_timeout_s=hello_timeout_s, strikes=strikes,
            ban_rounds=ban_rounds, parallel_streams=parallel_streams, validate=validate,
            metrics=self.metrics, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
            max_retries=max_retries, keepalive_s=keepalive_s,
        )  # fmt: skip
        self.peers = {n: a for n, a in peers.items() if n != site}
        run_heartbeat = rank == 0 if heartbeat is None else heartbeat
        self.membership: Membership | SwimMembership | None = (
            Membership(
                client=self.client,
                site=site,
                peers=self.peers,
                heartbeat_s=heartbeat_s,
                dead_after=dead_after,
                hello_timeout_s=hello_timeout_s,
            )  # fmt: skip
            if run_heartbeat and membership == "hello"
            else None
        )
        # SWIM binds UDP on the gRPC port number once the server has its port (in start())
        self._swim = dict(heartbeat_s=heartbeat_s, hello_timeout_s=hello_timeout_s, seed=seed,
                          key=swim_key(run_id, layout_hash)) if run_heartbeat and membership == "swim" else None  # fmt: skip
        if self._swim is not None and self.server.tls is not None:
            # under mTLS: pairwise keys of this life, handed out by the Swim.Key RPC
            self._swim.update(key=b"", keys=PairKeys(site, members))
            self.server.swim_keys = self._swim["keys"].key_for
        self._infos: dict[str, PeerInfo] = {}
        self._lock = threading.Lock()
        self._last_metrics: dict[str, float] = {}
        self._swim_folded = 0  # SWIM datagram bytes already added to ``swim_bytes``
        self._pairing: tuple[int, list[str]] | None = None  # the last (round, partners)
        # the pairing agreement: every member ever known (dead ones too; grows on joins)
        self._roster: set[str] = set(members)
        self._agree_pool = ThreadPoolExecutor(MAX_GROUP - 1, thread_name_prefix="agree")
        self.server.status_source = self.status

    @property
    def lo(self) -> int:
        return self.server.lo

    @property
    def hi(self) -> int:
        return self.server.hi

    def start(self) -> GossipNode:
        """Start serving (and heartbeating on the membership rank)."""
        self.server.start()
        if self._swim is not None and self.membership is None:
            self.membership = swim_membership(self.client, self.site, self.peers,
                                              self.server.address, **self._swim)  # fmt: skip
        if self.membership is not None:
            self.membership.start()
        return self

    def close(self) -> None:
        if self.membership is not None:
            self.membership.stop()
        self.client.close()
        self._agree_pool.shutdown(wait=False, cancel_futures=True)
        self.server.stop(grace=0.5)

    def __enter__(self) -> GossipNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def round_metrics(self) -> dict[str, float]:
        """Counters accumulated since the previous call, plus ``pull_mb_s``: one metrics.jsonl
        ``outer`` record's gossip figures (bytes_sent, bytes_recv, pull_seconds, fail_<cause>...)."""
        udp = getattr(self.membership, "udp", None)
        if udp is not None:  # SWIM datagrams this member sent, folded in as ``swim_bytes``
            sent, self._swim_folded = udp.bytes_sent - self._swim_folded, udp.bytes_sent
            self.metrics.add("swim_bytes", sent)
        now = self.metrics.snapshot()
        delta = GossipMetrics.delta(now, self._last_metrics)
        self._last_metrics = now
        return GossipMetrics.record(delta)

    def publish(self, round: int, stream: str, data, **kw) -> None:
        """Publish this rank's payload for ``round`` (see ``GossipServer.publish``)."""
        self.server.publish(round, stream, data, **kw)

    def live_sites(self) -> list[str]:
        """Live sites by this rank's heartbeats (membership rank), else the configured ones."""
        if self.membership is not None:
            return self.membership.live_sites()
        return sorted(set(self.peers) | {self.site})

    def partners(self, round: int, live_sites: list[str] | None = None) -> list[str]:
        """Partner sites of this site in ``round`` (empty: local round, n = 1)."""
        live = self.live_sites() if live_sites is None else live_sites
        got = partners(self.seed, round, live, self.site, self.odd, self.pairing)
        self._pairing = (round, list(got))
        return got

    def require_agreement(self, exempt: tuple[str, ...] = ()) -> None:
        """From now on this rank serves a round's payload streams (all but ``exempt``) only to
        the members of the site's settled group of that round (see :meth:`settle`)."""
        self.server.agreement.require(exempt)

    def propose(self, round: int, live: list[str], key: int | None = None) -> Proposal:
        """This site's proposal of ``round`` (the pairing of meeting ``key``, default
        ``round``) from the live view ``live`` and the roster, served from now on by this
        rank's Proposal RPC (no message). Every rank of a site given the same views proposes
        the same group."""
        self._roster.update(live)
        return propose_round(book=self.server.agreement, site=self.site, round=round,
                             view=live, roster=sorted(self._roster), seed=self.seed,
                             odd=self.odd, mode=self.pairing, key=key)  # fmt: skip

    def exchange(self, mine: Proposal, timeout_s: float | None = None) -> Settled:
        """Fetch the other members' proposals of ``mine`` from their rank 0 (each within
        ``timeout_s``, default the pull timeout) and settle (``agree_rpc.exchange``); no
        collective. Then call :meth:`settle` with the result's group."""
        return exchange(
            client=self.client, mine=mine, address_of=self._rank0_address, pool=self._agree_pool,
            timeout_s=self.client.timeout_s if timeout_s is None else timeout_s,
        )  # fmt: skip

    def agree(self, round: int, live: list[str], timeout_s: float | None = None) -> Settled:
        """:meth:`propose` then :meth:`exchange` (``loco.gossip.agree_rpc``)."""
        return self.exchange(self.propose(round, live), timeout_s)

    def settle(self, round: int, group: tuple[str, ...] | list[str]) -> None:
        """This site's settled group of ``round``: this rank serves the round to its members."""
        self.server.agreement.settle(round, tuple(group))
        self._pairing = (round, [s for s in group if s != self.site])

    def _rank0_address(self, site: str) -> str | None:
        info = self.peer_info(site)
        if info is None:
            return None
        return next((r.address for r in info.ranks if r.rank == 0), None)

    def status(self) -> pb.StatusResponse:
        """What the Status RPC answers on this rank (``loco.gossip.status.member_status``)."""
        return member_status(
            self.server, peers=sorted(self.peers), membership=self.membership,
            pairing=self._pairing,
        )  # fmt: skip

    def peer_info(self, site: str) -> PeerInfo | None:
        """Hello answer of ``site`` (membership cache, else a Hello now); None if unreachable."""
        try:
            return self._peer_info(site)
        except GossipError:
            return None

    def _peer_info(self, site: str) -> PeerInfo:
        if self.membership is not None and (info := self.membership.peer(site)) is not None:
            return info
        with self._lock:
            info = self._infos.get(site)
        if info is None:
            if site not in self.peers:
                raise PeerUnavailable(f"{site}: not a configured peer", peer=site)
            info = self.client.hello(self.peers[site], expect_site=site)
            with self._lock:
                self._infos[site] = info
        return info

    def strike(self, partner: str, round: int, reason: str) -> None:
        """Count a bad payload of ``partner`` found after its pull (see GossipClient.strike)."""
        self.client.strike(partner, round, reason)

    def count_failure(self, cause: str, n: int = 1) -> None:
        """Count ``n`` failures that the caller found after a pull: ``fail_<cause>`` in the
        next :meth:`round_metrics`. No strike; call :meth:`strike` for that."""
        self.metrics.add(f"fail_{cause}", n)

    def count(self, key: str, n: float = 1) -> None:
        """Add ``n`` to the figure ``key`` of the next :meth:`round_metrics`."""
        self.metrics.add(key, n)

    def reject(self, partner: str, round: int, cause: str, reason: str) -> None:
        """A payload of ``partner`` found bad after its pull: :meth:`count_failure` of
        ``cause`` and a :meth:`strike` with ``reason``."""
        self.count_failure(cause)
        self.strike(partner, round, reason)

    def served_mark(self) -> float:
        """The number of pulls this rank has served so far: a mark for :meth:`wait_quiet`."""
        return self.metrics.snapshot().get("served_pulls", 0.0)

    def wait_quiet(self, expected: int, *, since: float = 0.0, quiet_s: float = 1.0,
                   timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:  # fmt: skip
        """Block until at least ``expected`` pulls were served after the mark ``since`` (see
        :meth:`served_mark`) and none arrived for ``quiet_s``, or ``timeout_s`` passed.

        Returns True when the pulls arrived and went quiet, False on the timeout. With
        ``expected <= 0`` it returns True at once.
        """
        if expected <= 0:
            return True
        t0 = last_change = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout_s:
            served = self.served_mark()
            now = time.monotonic()
            if served != last:
                last, last_change = served, now
            if served - since >= expected and now - last_change >= quiet_s:
                return True
            time.sleep(poll_s)
        return False

    def pull(self, partner: str, round: int, stream: str, *, lo: int | None = None,
             hi: int | None = None, **kw) -> PullResult:  # fmt: skip
        """Pull ``[lo, hi)`` (default: this rank's own range) of ``partner``'s ``stream`` for
        ``round``; never raises."""
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        try:
            info = self._peer_info(partner)
        except GossipError as e:
            res = PullResult(peer=partner, round=round, stream=stream, lo=lo, hi=hi, error=e)
            self.metrics.add("pulls_failed")
            self.metrics.add(f"fail_{e.cause}")
            self._mark_pull(partner, round, False)
            return res
        res = self.client.pull(info, round, stream, lo, hi, **kw)
        self._mark_pull(partner, round, res.ok)
        if not res.ok and res.cause in ("unavailable", "mismatch"):
            with self._lock:
                self._infos.pop(partner, None)  # re-Hello next time (it may have restarted)
        return res

    def _mark_pull(self, partner: str, round: int, ok: bool) -> None:
        """The latest round pulled from a configured peer, and whether it came (for Status)."""
        if partner in self.peers:
            self.metrics.set_peer(partner, "paired_round", round)
            self.metrics.set_peer(partner, "paired_ok", float(ok))
