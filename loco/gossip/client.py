"""Client side of the gossip protocol: Hello, range pulls from several owner ranks, FetchState.

Contract: :meth:`GossipClient.pull` never raises for peer or network failures; it returns a
:class:`PullResult` whose ``ok`` is False and whose ``error`` is a typed
:class:`~loco.gossip.errors.GossipError` (``result.cause`` is the counter name). The caller turns
that into a local round (n = 1). ``hello`` raises ``GossipError`` (membership catches it).
Every RPC carries a deadline; UNAVAILABLE is retried with exponential backoff and jitter until
the deadline, resuming a broken stream at the first element not yet received.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from ._pb import gossip_pb2 as pb
from .counters import GossipMetrics
from .errors import (
    BadPayload,
    BadRequest,
    GossipError,
    PeerBanned,
    PeerMismatch,
    from_rpc_error,
)
from .framing import (
    ITEMSIZE,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
)
from .options import GossipOptions
from .records import (  # re-exported: the client's API names them
    PeerInfo,
    PullResult,
    RankInfo,
    ReceivedSegment,
    SegmentBytes,
    Validator,
    default_segment_bytes,
)
from .server import SERVICE
from .streams import PullState, Request, StreamReader
from .tls import TlsConfig, channel_credentials

log = logging.getLogger(__name__)

__all__ = ["GossipClient", "PeerInfo", "PullResult", "RankInfo", "ReceivedSegment",
           "SegmentBytes", "Validator", "channel_options", "default_segment_bytes"]  # fmt: skip


def channel_options(keepalive_s: float = GossipOptions.keepalive_s) -> list[tuple[str, int]]:
    """Channel args of the client: message limits, keepalive, fast reconnects."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.use_local_subchannel_pool", 1),
    ]


class GossipClient:
    """Pulls from partner sites for one rank (thread-safe; share it across threads).

    Args:
        site: this site's name (sent for logging; identity is the certificate).
        run_id, layout_hash: must match the partner's; checked by both sides.
        tls: mTLS material; required unless ``insecure=True``.
        timeout_s: default deadline of a whole pull (all owners, retries included).
        hello_timeout_s: deadline of one Hello.
        backoff_s, backoff_max_s: retry backoff base and cap (jitter x0.5..1.5).
        max_retries: retries of one owner stream on UNAVAILABLE (within the deadline).
        parallel_streams: concurrent sub-range streams per owner rank (raw payloads), each on
            its own HTTP/2 connection; helps on high-RTT links.
        strikes, ban_rounds: after ``strikes`` bad payloads a peer site is ignored for
            ``ban_rounds`` rounds.
        validate: optional check called on every received payload (raw: the assembled range;
            opaque: each segment); any exception counts as a bad payload.
    """

    def __init__(
        self,
        *,
        site: str,
        run_id: str,
        layout_hash: str,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        timeout_s: float = GossipOptions.pull_timeout_s,
        hello_timeout_s: float = GossipOptions.hello_timeout_s,
        backoff_s: float = GossipOptions.backoff_s,
        backoff_max_s: float = GossipOptions.backoff_max_s,
        max_retries: int = GossipOptions.max_retries,
        parallel_streams: int = GossipOptions.parallel_streams,
        strikes: int = GossipOptions.strikes,
        ban_rounds: int = GossipOptions.ban_rounds,
        keepalive_s: float = GossipOptions.keepalive_s,
        validate: Validator | None = None,
        metrics: GossipMetrics | None = None,
        max_workers: int = 32,
    ) -> None:
        if tls is None and not insecure:
            raise ValueError("GossipClient needs tls=TlsConfig(...) or insecure=True (plaintext)")
        self.site, self.run_id, self.layout_hash = site, run_id, layout_hash
        self.tls = None if insecure else tls
        self.timeout_s, self.hello_timeout_s = timeout_s, hello_timeout_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.max_retries = max_retries
        self.parallel_streams = max(1, parallel_streams)
        self.max_strikes, self.ban_rounds = strikes, ban_rounds
        self.keepalive_s = keepalive_s
        self.validate = validate
        self.metrics = metrics or GossipMetrics()
        self._channels: dict[tuple[str, str, int], grpc.Channel] = {}
        self._lock = threading.Lock()
        self._strikes: dict[str, int] = {}
        self._banned_until: dict[str, int] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="gossip-pull")
        self._rng = random.Random()
        self._reader = StreamReader(self)

    # ---------------------------------------------------------------- channels

    def _channel(self, address: str, site: str, index: int = 0) -> grpc.Channel:
        key = (address, site, index)
        with self._lock:
            ch = self._channels.get(key)
            if ch is None:
                opts = channel_options(self.keepalive_s) + [("loco.stream_index", index)]
                if self.tls is None:
                    ch = grpc.insecure_channel(address, options=opts)
                else:
                    if not site:
                        raise ValueError("a TLS channel needs the peer's site name")
                    opts.append(("grpc.ssl_target_name_override", site))
                    ch = grpc.secure_channel(address, channel_credentials(self.tls), options=opts)
                self._channels[key] = ch
            return ch

    def close(self) -> None:
        """Close every channel and the worker pool."""
        with self._lock:
            chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            ch.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GossipClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- hello

    def hello(
        self, address: str, *, expect_site: str = "", timeout_s: float | None = None
    ) -> PeerInfo:
        """Hello to ``address``; raises ``GossipError`` (``PeerMismatch`` on run/layout/site).

        With TLS, ``expect_site`` is required (it is the name the server certificate must carry).
        """
        call = self._channel(address, expect_site).unary_unary(
            f"/{SERVICE}/Hello",
            request_serializer=pb.HelloRequest.SerializeToString,
            response_deserializer=pb.HelloResponse.FromString,
        )
        req = pb.HelloRequest(
            run_id=self.run_id,
            protocol_version=PROTOCOL_VERSION,
            layout_hash=self.layout_hash,
            site=self.site,
        )
        self.metrics.add("hello_bytes", req.ByteSize())
        try:
            resp = call(req, timeout=timeout_s or self.hello_timeout_s)
        except grpc.RpcError as e:
            self.metrics.add("hello_failed")
            raise from_rpc_error(e, expect_site or address) from None
        self.metrics.add("hello_bytes", resp.ByteSize())
        info = PeerInfo.from_pb(resp)
        problems = []
        if info.run_id != self.run_id:
            problems.append(f"run_id {info.run_id!r} != {self.run_id!r}")
        if info.layout_hash != self.layout_hash:
            problems.append(f"layout_hash {info.layout_hash!r} != {self.layout_hash!r}")
        if info.protocol_version != PROTOCOL_VERSION:
            problems.append(f"protocol {info.protocol_version} != {PROTOCOL_VERSION}")
        if expect_site and info.site != expect_site:
            problems.append(f"site {info.site!r} != {expect_site!r}")
        if not problems:
            problems += [f"bad rank table: {p}" for p in info.problems()]
        if problems:
            self.metrics.add("hello_failed")
            raise PeerMismatch(f"{address}: " + "; ".join(problems), peer=expect_site or address)
        self.metrics.add("hello_ok")
        return info.dialed_at(address)

    # ---------------------------------------------------------------- strikes

    def is_banned(self, site: str, round: int) -> bool:
        with self._lock:
            return round < self._banned_until.get(site, -(1 << 62))

    def _strike(self, site: str, round: int, err: GossipError) -> None:
        with self._lock:
            n = self._strikes.get(site, 0) + 1
            self._strikes[site] = n
            banned = n >= self.max_strikes
            if banned:
                self._strikes[site] = 0
                self._banned_until[site] = round + 1 + self.ban_rounds
        self.metrics.add("strikes")
        self.metrics.add_peer(site, "strikes")
        if banned:
            self.metrics.add_peer(site, "bans")
            self.metrics.set_peer(site, "banned_until", round + 1 + self.ban_rounds)
        log.warning("bad payload from %s (strike %d/%d): %s", site, n, self.max_strikes, err)
        if banned:
            self.metrics.add("bans")
            log.warning("ignoring %s for %d rounds after %d strikes", site, self.ban_rounds, n)

    # ---------------------------------------------------------------- pulls

    def pull(
        self,
        peer: PeerInfo,
        round: int,
        stream: str,
        lo: int,
        hi: int,
        *,
        dtype: str = "float32",
        timeout_s: float | None = None,
        validate: Validator | None = None,
        out=None,
        codec: str | None = None,
        segment_bytes: SegmentBytes | None = None,
    ) -> PullResult:
        """Pull elements ``[lo, hi)`` of ``stream`` for ``round`` from the owner ranks of ``peer``.

        Owner ranks are pulled in parallel. ``out``: optional writable buffer of
        ``(hi - lo) * itemsize`` bytes (e.g. ``tensor.numpy()``) that raw data lands in directly
        (the stream must then be raw); on failure its content is undefined. ``codec``: the only
        codec label accepted (None: any). ``segment_bytes``: the most bytes an opaque segment
        of n values may hold (default :func:`default_segment_bytes`); all the opaque segments
        of one owner piece together hold at most ``segment_bytes`` of the owner's whole range. Never raises for remote failures: see PullResult.
        """
        req = Request("Pull", round, stream, lo, hi, dtype, codec, segment_bytes, validate)
        return self._run(peer, req, timeout_s, out)

    def fetch_state(
        self,
        peer: PeerInfo,
        name: str,
        lo: int,
        hi: int,
        *,
        dtype: str = "float32",
        timeout_s: float | None = None,
        validate: Validator | None = None,
        out=None,
        codec: str | None = None,
        segment_bytes: SegmentBytes | None = None,
    ) -> PullResult:
        """Like ``pull`` for the latest published state stream ``name`` (joining site).

        ``result.round`` is the state version the peer published; every piece of the result is
        of that one version (pieces of two versions fail the fetch with cause ``moved``).
        """
        req = Request("FetchState", -1, name, lo, hi, dtype, codec, segment_bytes, validate)
        return self._run(peer, req, timeout_s, out)

    def strike(self, site: str, round: int, reason: str) -> None:
        """Count a bad payload of ``site`` found after the pull (it did not decode, assemble or
        pass a plausibility check); ``strikes`` of them ban the site for ``ban_rounds``.
        The caller counts the failure itself (``fail_<cause>``)."""
        self._strike(site, round, BadPayload(f"{site}: {reason}", peer=site))

    def _run(self, peer: PeerInfo, req: Request, timeout_s: float | None, out) -> PullResult:
        t0 = time.monotonic()
        res = PullResult(peer=peer.site, round=req.round, stream=req.stream, lo=req.lo, hi=req.hi)
        deadline = t0 + (timeout_s if timeout_s is not None else self.timeout_s)
        try:
            self._admit(peer, req)
            data = self._payload_buffer(peer, req, out)
            ctx = PullState(peer, req, res, deadline, data, raw_only=out is not None)
            self._reader.pull_all(ctx)
            if req.method == "FetchState":
                res.round = ctx.version()
            self._validate(peer, req, res)
            if res.segments:
                res.data = None
            res.ok = True
        except GossipError as e:
            res.ok, res.error, res.data, res.segments = False, e, None, []
            if isinstance(e, BadPayload):
                self._strike(peer.site, req.round, e)
        res.seconds = time.monotonic() - t0
        self._count(res)
        return res

    def _admit(self, peer: PeerInfo, req: Request) -> None:
        """Refuse a pull that must not start: a banned peer, a request outside the peer's flat
        space, an unusable rank table."""
        if req.method == "Pull" and self.is_banned(peer.site, req.round):
            raise PeerBanned(
                f"{peer.site} is banned until round {self._banned_until[peer.site]}",
                peer=peer.site,
            )
        if not 0 <= req.lo < req.hi <= peer.flat_size or req.dtype not in ITEMSIZE:
            raise BadRequest(
                f"bad request [{req.lo},{req.hi}) of {peer.flat_size} ({req.dtype})",
                peer=peer.site,
            )
        if problems := peer.problems():
            raise BadPayload(f"{peer.site}: bad rank table: {problems[0]}", peer=peer.site)

    def _payload_buffer(self, peer: PeerInfo, req: Request, out) -> memoryview:
        """Where raw data lands: the caller's ``out`` or a new (uninitialised) buffer."""
        nbytes = (req.hi - req.lo) * ITEMSIZE[req.dtype]
        if out is None:  # np.empty: no zero-fill pass over the buffer
            return memoryview(np.empty(nbytes, np.uint8)).cast("B")
        mv = memoryview(out).cast("B")
        if mv.readonly or len(mv) != nbytes:
            raise BadRequest(f"out must be a writable buffer of {nbytes} bytes", peer=peer.site)
        return mv

    def _validate(self, peer: PeerInfo, req: Request, res: PullResult) -> None:
        check = req.validate or self.validate
        if check is None:
            return
        try:
            if not res.segments:
                check(res.data, req.hi - req.lo, req.lo)
            for seg in res.segments:
                check(memoryview(seg.data), seg.hi - seg.lo, seg.lo)
        except Exception as e:  # noqa: BLE001 (any validator failure is a bad payload)
            raise BadPayload(f"{peer.site}: validate failed: {e!r}", peer=peer.site) from e

    def _count(self, res: PullResult) -> None:
        self.metrics.add_peer(res.peer, "bytes_recv", res.bytes_recv)
        if res.ok:
            self.metrics.add("pulls_ok")
            self.metrics.add("pull_seconds", res.seconds)
            return
        self.metrics.add("pulls_failed")
        self.metrics.add(f"fail_{res.cause}")
        log.warning("pull %s round %d %s [%d,%d) failed (%s): %s", res.peer, res.round,
                    res.stream, res.lo, res.hi, res.cause, res.error)  # fmt: skip
