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
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from ._pb import gossip_pb2 as pb
from .errors import (
    BadPayload,
    BadRequest,
    GossipError,
    PeerBanned,
    PeerMismatch,
    PeerUnavailable,
    PullTimeout,
    from_rpc_error,
    is_retryable,
)
from .metrics import GossipMetrics
from .ranges import split_range
from .server import SERVICE
from .tls import TlsConfig, channel_credentials
from .wire import (
    ITEMSIZE,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    crc32_combine,
    decode_chunk,
    identity,
)

log = logging.getLogger(__name__)

Validator = Callable[[memoryview], None]


def channel_options(keepalive_s: float = 30.0) -> list[tuple[str, int]]:
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


@dataclass(frozen=True)
class RankInfo:
    rank: int
    address: str
    lo: int
    hi: int


@dataclass(frozen=True)
class PeerInfo:
    """What a site said in Hello: identity, layout and where each of its ranks listens."""

    site: str
    run_id: str
    layout_hash: str
    protocol_version: int
    nproc: int
    flat_size: int
    ranks: tuple[RankInfo, ...]
    current_round: int

    @staticmethod
    def from_pb(msg: pb.HelloResponse) -> PeerInfo:
        return PeerInfo(
            site=msg.site,
            run_id=msg.run_id,
            layout_hash=msg.layout_hash,
            protocol_version=msg.protocol_version,
            nproc=msg.nproc,
            flat_size=msg.flat_size,
            ranks=tuple(RankInfo(r.rank, r.address, r.lo, r.hi) for r in msg.ranks),
            current_round=msg.current_round,
        )


@dataclass
class ReceivedSegment:
    """An opaque (non-raw) segment as sent by an owner rank: its own flat range and bytes."""

    lo: int
    hi: int
    codec: str
    dtype: str
    data: bytearray
    rank: int


@dataclass
class PullResult:
    """Outcome of one pull. ``ok`` False means: treat this partner as absent this round.

    For raw payloads ``data`` is a writable byte memoryview of exactly the elements
    ``[lo, hi)``, bitwise as published (over the caller's ``out`` buffer when one was given);
    for opaque codecs ``segments`` holds the owner segments covering ``[lo, hi)``, sorted.
    """

    peer: str
    round: int
    stream: str
    lo: int
    hi: int
    ok: bool = False
    data: memoryview | None = None
    segments: list[ReceivedSegment] = field(default_factory=list)
    error: GossipError | None = None
    bytes_recv: int = 0
    seconds: float = 0.0
    retries: int = 0

    @property
    def cause(self) -> str:
        """'' when ok, else the failure counter name (unavailable, timeout, bad_payload, ...)."""
        return "" if self.ok else (self.error.cause if self.error else "rpc")

    def raise_for_error(self) -> None:
        """Raise the typed ``GossipError`` of a failed pull (no-op when ok)."""
        if not self.ok:
            raise self.error or GossipError("pull failed", peer=self.peer)


class _Cancelled(Exception):
    pass


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
        timeout_s: float = 60.0,
        hello_timeout_s: float = 5.0,
        backoff_s: float = 0.2,
        backoff_max_s: float = 2.0,
        max_retries: int = 6,
        parallel_streams: int = 1,
        strikes: int = 3,
        ban_rounds: int = 5,
        keepalive_s: float = 30.0,
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
        # drills only (loco.faults): ``blocked(site)`` True = the link to ``site`` is cut
        self.blocked: Callable[[str], bool] | None = None
        self._channels: dict[tuple[str, str, int], grpc.Channel] = {}
        self._lock = threading.Lock()
        self._strikes: dict[str, int] = {}
        self._banned_until: dict[str, int] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="gossip-pull")
        self._rng = random.Random()

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
        if self.blocked is not None and expect_site and self.blocked(expect_site):
            self.metrics.add("hello_failed")
            raise PeerUnavailable(f"{expect_site}: link cut (fault drill)", peer=expect_site)
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
        try:
            resp = call(req, timeout=timeout_s or self.hello_timeout_s)
        except grpc.RpcError as e:
            self.metrics.add("hello_failed")
            raise from_rpc_error(e, expect_site or address) from None
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
        if problems:
            self.metrics.add("hello_failed")
            raise PeerMismatch(f"{address}: " + "; ".join(problems), peer=expect_site or address)
        self.metrics.add("hello_ok")
        return info

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
    ) -> PullResult:
        """Pull elements ``[lo, hi)`` of ``stream`` for ``round`` from the owner ranks of ``peer``.

        Owner ranks are pulled in parallel. ``out``: optional writable buffer of
        ``(hi - lo) * itemsize`` bytes (e.g. ``tensor.numpy()``) that raw data lands in directly;
        on failure its content is undefined. Never raises for remote failures: see PullResult.
        """
        return self._run(peer, "Pull", round, stream, lo, hi, dtype, timeout_s, validate, out)

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
    ) -> PullResult:
        """Like ``pull`` for the latest published state stream ``name`` (joining site).

        ``result.round`` is the state version the peer published.
        """
        return self._run(peer, "FetchState", -1, name, lo, hi, dtype, timeout_s, validate, out)

    def _run(
        self,
        peer: PeerInfo,
        method: str,
        round: int,
        stream: str,
        lo: int,
        hi: int,
        dtype: str,
        timeout_s: float | None,
        validate: Validator | None,
        out,
    ) -> PullResult:
        t0 = time.monotonic()
        res = PullResult(peer=peer.site, round=round, stream=stream, lo=lo, hi=hi)
        deadline = t0 + (timeout_s if timeout_s is not None else self.timeout_s)
        try:
            if self.blocked is not None and self.blocked(peer.site):
                raise PeerUnavailable(f"{peer.site}: link cut (fault drill)", peer=peer.site)
            if method == "Pull" and self.is_banned(peer.site, round):
                raise PeerBanned(
                    f"{peer.site} is banned until round {self._banned_until[peer.site]}",
                    peer=peer.site,
                )
            if not 0 <= lo < hi <= peer.flat_size or dtype not in ITEMSIZE:
                raise BadRequest(
                    f"bad request [{lo},{hi}) of {peer.flat_size} ({dtype})", peer=peer.site
                )
            self._pull_all(peer, method, round, stream, lo, hi, dtype, deadline, res, out)
            check = validate or self.validate
            if check is not None:
                try:
                    if res.data is not None and not res.segments:
                        check(res.data)
                    for seg in res.segments:
                        check(memoryview(seg.data))
                except Exception as e:  # noqa: BLE001 (any validator failure is a bad payload)
                    raise BadPayload(f"{peer.site}: validate failed: {e!r}", peer=peer.site) from e
            if res.segments:
                res.data = None
            res.ok = True
        except GossipError as e:
            res.ok, res.error, res.data, res.segments = False, e, None, []
            if isinstance(e, BadPayload):
                self._strike(peer.site, round, e)
        res.seconds = time.monotonic() - t0
        if res.ok:
            self.metrics.add("pulls_ok")
            self.metrics.add("pull_seconds", res.seconds)
        else:
            self.metrics.add("pulls_failed")
            self.metrics.add(f"fail_{res.cause}")
            log.warning(
                "pull %s round %d %s [%d,%d) failed (%s): %s",
                peer.site,
                round,
                stream,
                lo,
                hi,
                res.cause,
                res.error,
            )
        return res

    def _pull_all(
        self,
        peer: PeerInfo,
        method: str,
        round: int,
        stream: str,
        lo: int,
        hi: int,
        dtype: str,
        deadline: float,
        res: PullResult,
        out,
    ) -> None:
        isz = ITEMSIZE[dtype]
        if out is None:  # np.empty: no zero-fill pass over the buffer
            res.data = memoryview(np.empty((hi - lo) * isz, np.uint8)).cast("B")
        else:
            res.data = memoryview(out).cast("B")
            if res.data.readonly or len(res.data) != (hi - lo) * isz:
                raise BadRequest(
                    f"out must be a writable buffer of {(hi - lo) * isz} bytes", peer=peer.site
                )
        pieces = []
        for r in peer.ranks:
            a, b = max(lo, r.lo), min(hi, r.hi)
            if a < b:
                for k, (pa, pb_) in enumerate(split_range(a, b, self.parallel_streams)):
                    pieces.append((r, pa, pb_, k))
        covered = sum(b - a for _, a, b, _ in pieces)
        if covered != hi - lo:
            raise BadPayload(
                f"{peer.site}: ranks cover {covered} of {hi - lo} elements", peer=peer.site
            )
        stop = threading.Event()
        calls: list = []
        jobs = [
            self._pool.submit(
                self._pull_piece,
                peer,
                method,
                r,
                a,
                b,
                k,
                round,
                stream,
                lo,
                dtype,
                deadline,
                res,
                stop,
                calls,
            )
            for r, a, b, k in pieces
        ]
        first: GossipError | None = None
        for job in futures.as_completed(jobs):
            try:
                for seg in job.result():  # parallel sub-streams may repeat an opaque segment
                    if not any(
                        (g.rank, g.lo, g.hi) == (seg.rank, seg.lo, seg.hi) for g in res.segments
                    ):
                        res.segments.append(seg)
            except _Cancelled:
                pass
            except GossipError as e:
                if first is None:
                    first = e
                    stop.set()
                    with self._lock:
                        for c in calls:
                            c.cancel()
            except Exception as e:  # noqa: BLE001 (never let a transport bug escape)
                if first is None:
                    first = GossipError(f"{peer.site}: {e!r}", peer=peer.site)
                    stop.set()
        if first is not None:
            raise first
        res.segments.sort(key=lambda s: s.lo)

    def _pull_piece(
        self,
        peer: PeerInfo,
        method: str,
        r: RankInfo,
        a: int,
        b: int,
        k: int,
        round: int,
        stream: str,
        lo0: int,
        dtype: str,
        deadline: float,
        res: PullResult,
        stop: threading.Event,
        calls: list,
    ) -> list[ReceivedSegment]:
        """Stream [a, b) from owner rank ``r`` into ``res.data`` (raw) or return opaque segments."""
        isz = ITEMSIZE[dtype]
        ch = self._channel(r.address, peer.site, k)
        if method == "Pull":
            rpc = ch.unary_stream(
                f"/{SERVICE}/Pull",
                request_serializer=pb.PullRequest.SerializeToString,
                response_deserializer=identity,
            )
        else:
            rpc = ch.unary_stream(
                f"/{SERVICE}/FetchState",
                request_serializer=pb.FetchStateRequest.SerializeToString,
                response_deserializer=identity,
            )
        opaque: list[ReceivedSegment] = []
        nxt, attempt = a, 0
        out = res.data
        last: GossipError | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if last is not None:
                    raise last
                raise PullTimeout(
                    f"{peer.site}/{r.rank}: deadline passed before [{nxt},{b})", peer=peer.site
                )
            if method == "Pull":
                req = pb.PullRequest(
                    run_id=self.run_id,
                    layout_hash=self.layout_hash,
                    round=round,
                    stream=stream,
                    lo=nxt,
                    hi=b,
                    site=self.site,
                )
            else:
                req = pb.FetchStateRequest(
                    run_id=self.run_id,
                    layout_hash=self.layout_hash,
                    name=stream,
                    lo=nxt,
                    hi=b,
                    site=self.site,
                )
            call = rpc(req, timeout=left)
            start_nxt = nxt
            with self._lock:
                calls.append(call)
            hdr, got, crc_run = None, 0, 0
            try:
                buf: memoryview | bytearray | None = None
                for msg in call:
                    if stop.is_set():
                        call.cancel()
                        raise _Cancelled()
                    try:
                        h, data, crc = decode_chunk(msg)
                    except Exception as e:  # noqa: BLE001
                        raise BadPayload(
                            f"{peer.site}/{r.rank}: undecodable chunk: {e!r}", peer=peer.site
                        ) from e
                    if h is not None:
                        if hdr is not None:
                            raise BadPayload(
                                f"{peer.site}/{r.rank}: header inside a segment", peer=peer.site
                            )
                        self._check_header(peer, r, h, method, round, stream, nxt, b, dtype)
                        if method == "FetchState":
                            res.round = h.round
                        hdr, got, crc_run = h, 0, 0
                        if h.codec == "raw":
                            off = (h.lo - lo0) * isz
                            buf = out[off : off + h.length]
                        else:
                            buf = bytearray(h.length)
                    else:
                        if hdr is None:
                            raise BadPayload(
                                f"{peer.site}/{r.rank}: data before header", peer=peer.site
                            )
                        n = len(data)
                        if got + n > hdr.length or zlib.crc32(data) != crc:
                            raise BadPayload(
                                f"{peer.site}/{r.rank}: chunk checksum/length mismatch "
                                f"in round {round} {stream}",
                                peer=peer.site,
                            )
                        buf[got : got + n] = data
                        got += n
                        crc_run = crc32_combine(crc_run, crc, n)
                        self.metrics.add("bytes_recv", n)
                        with self._lock:
                            res.bytes_recv += n
                    if hdr is not None and got == hdr.length:
                        if crc_run != hdr.crc32:
                            raise BadPayload(
                                f"{peer.site}/{r.rank}: segment checksum mismatch", peer=peer.site
                            )
                        if hdr.codec != "raw":
                            opaque.append(
                                ReceivedSegment(hdr.lo, hdr.hi, hdr.codec, hdr.dtype, buf, r.rank)
                            )
                        nxt, hdr = min(b, hdr.hi), None
                if hdr is not None or nxt < b:
                    raise BadPayload(
                        f"{peer.site}/{r.rank}: stream ended at {nxt} of [{a},{b})", peer=peer.site
                    )
                return opaque
            except grpc.RpcError as e:
                if stop.is_set():
                    raise _Cancelled() from None
                err = last = from_rpc_error(e, peer.site)
                if hdr is not None and hdr.codec == "raw":  # chunks so far passed their CRC
                    nxt = hdr.lo + got // isz
                if nxt > start_nxt:
                    attempt = 0  # progress was made: the retry budget is per stall, not per pull
                left = deadline - time.monotonic()
                if not is_retryable(err) or left <= 0 or attempt >= self.max_retries:
                    raise err from None
                attempt += 1
                res.retries += 1
                self.metrics.add("retries")
                pause = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(min(left, pause * self._rng.uniform(0.5, 1.5)))
            finally:
                call.cancel()  # no-op when the stream completed; stops the peer on errors
                with self._lock:
                    if call in calls:
                        calls.remove(call)

    def _check_header(
        self,
        peer: PeerInfo,
        r: RankInfo,
        h: pb.SegmentHeader,
        method: str,
        round: int,
        stream: str,
        nxt: int,
        b: int,
        dtype: str,
    ) -> None:
        bad = []
        if h.run_id != self.run_id:
            bad.append(f"run_id {h.run_id!r}")
        if h.layout_hash != self.layout_hash:
            bad.append(f"layout_hash {h.layout_hash!r}")
        if method == "Pull" and h.round != round:
            bad.append(f"round {h.round} != {round}")
        if h.stream != stream:
            bad.append(f"stream {h.stream!r}")
        if h.site != peer.site:
            bad.append(f"site {h.site!r}")
        if h.codec == "raw":
            if h.dtype != dtype:
                bad.append(f"dtype {h.dtype!r} != {dtype!r}")
            elif not (h.lo == nxt < h.hi <= b) or h.length != (h.hi - h.lo) * ITEMSIZE[dtype]:
                bad.append(f"raw range [{h.lo},{h.hi}) len {h.length} for next {nxt} of [..,{b})")
        elif not (h.lo <= nxt < h.hi) or h.length > (h.hi - h.lo) * 8 + (1 << 20):
            bad.append(f"opaque range [{h.lo},{h.hi}) len {h.length} for next {nxt}")
        if bad:
            raise BadPayload(f"{peer.site}/{r.rank}: bad header: " + ", ".join(bad), peer=peer.site)
