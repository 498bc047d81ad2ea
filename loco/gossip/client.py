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
import re
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

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
    PullTimeout,
    StateMoved,
    from_rpc_error,
    is_retryable,
)
from .framing import (
    ITEMSIZE,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    crc32_combine,
    decode_chunk,
    identity,
)
from .options import GossipOptions
from .ranges import rank_range, split_range
from .server import SERVICE
from .tls import TlsConfig, channel_credentials

log = logging.getLogger(__name__)

Validator = Callable[[memoryview, int], None]
"""``check(buf, numel)``: raise if ``buf`` is not a valid payload of ``numel`` values."""
SegmentBytes = Callable[[int], int]
"""``limit(numel)``: the most bytes an opaque segment of ``numel`` values may hold."""

MAX_RANKS = 4096  # ranks a peer may report in Hello
MAX_FLAT_SIZE = 1 << 40  # values a peer's flat vector may have (4 TiB of fp32)
MAX_ADDRESS = 256  # characters of a rank address
SEGMENT_SLACK = 4096  # bytes an opaque segment may hold beyond its per-value bound
MAX_SEGMENTS = 1024  # opaque segments one owner piece may send (an honest owner sends one)
_CODEC_LABEL = re.compile(r"[a-z][a-z0-9_.-]{0,31}")  # an opaque codec label (never "raw")


def default_segment_bytes(numel: int) -> int:
    """Without a caller's bound an opaque segment holds at most 8 bytes per value."""
    return 8 * numel + SEGMENT_SLACK


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
        """The answer as sent; :meth:`problems` says what is wrong with its rank table."""
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

    def problems(self) -> list[str]:
        """What makes this rank table unusable: the ranks must be ``0..nproc-1`` in order,
        each owning exactly ``rank_range(flat_size, nproc, rank)``, so they partition
        ``[0, flat_size)`` (an empty list means usable)."""
        if not 1 <= self.nproc <= MAX_RANKS:
            return [f"nproc {self.nproc} not in [1, {MAX_RANKS}]"]
        if not 1 <= self.flat_size <= MAX_FLAT_SIZE:
            return [f"flat_size {self.flat_size} not in [1, {MAX_FLAT_SIZE}]"]
        if len(self.ranks) != self.nproc:
            return [f"{len(self.ranks)} ranks listed for nproc {self.nproc}"]
        for i, r in enumerate(self.ranks):
            want = rank_range(self.flat_size, self.nproc, i)
            if r.rank != i or (r.lo, r.hi) != want:
                return [f"rank {r.rank} at position {i} owns [{r.lo},{r.hi}), not {list(want)}"]
            if not r.address or len(r.address) > MAX_ADDRESS:
                return [f"rank {i} has an address of {len(r.address)} characters"]
        return []


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
        if not problems:
            problems += [f"bad rank table: {p}" for p in info.problems()]
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
        req = _Request("Pull", round, stream, lo, hi, dtype, codec, segment_bytes, validate)
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
        req = _Request("FetchState", -1, name, lo, hi, dtype, codec, segment_bytes, validate)
        return self._run(peer, req, timeout_s, out)

    def strike(self, site: str, round: int, reason: str) -> None:
        """Count a bad payload of ``site`` found after the pull (it did not decode, assemble or
        pass a plausibility check); ``strikes`` of them ban the site for ``ban_rounds``.
        The caller counts the failure itself (``fail_<cause>``)."""
        self._strike(site, round, BadPayload(f"{site}: {reason}", peer=site))

    def _run(self, peer: PeerInfo, req: _Request, timeout_s: float | None, out) -> PullResult:
        t0 = time.monotonic()
        res = PullResult(peer=peer.site, round=req.round, stream=req.stream, lo=req.lo, hi=req.hi)
        deadline = t0 + (timeout_s if timeout_s is not None else self.timeout_s)
        try:
            self._admit(peer, req)
            data = self._payload_buffer(peer, req, out)
            ctx = _Pull(peer, req, res, deadline, data, raw_only=out is not None)
            self._pull_all(ctx)
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

    def _admit(self, peer: PeerInfo, req: _Request) -> None:
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

    def _payload_buffer(self, peer: PeerInfo, req: _Request, out) -> memoryview:
        """Where raw data lands: the caller's ``out`` or a new (uninitialised) buffer."""
        nbytes = (req.hi - req.lo) * ITEMSIZE[req.dtype]
        if out is None:  # np.empty: no zero-fill pass over the buffer
            return memoryview(np.empty(nbytes, np.uint8)).cast("B")
        mv = memoryview(out).cast("B")
        if mv.readonly or len(mv) != nbytes:
            raise BadRequest(f"out must be a writable buffer of {nbytes} bytes", peer=peer.site)
        return mv

    def _validate(self, peer: PeerInfo, req: _Request, res: PullResult) -> None:
        check = req.validate or self.validate
        if check is None:
            return
        try:
            if not res.segments:
                check(res.data, req.hi - req.lo)
            for seg in res.segments:
                check(memoryview(seg.data), seg.hi - seg.lo)
        except Exception as e:  # noqa: BLE001 (any validator failure is a bad payload)
            raise BadPayload(f"{peer.site}: validate failed: {e!r}", peer=peer.site) from e

    def _count(self, res: PullResult) -> None:
        if res.ok:
            self.metrics.add("pulls_ok")
            self.metrics.add("pull_seconds", res.seconds)
            return
        self.metrics.add("pulls_failed")
        self.metrics.add(f"fail_{res.cause}")
        log.warning("pull %s round %d %s [%d,%d) failed (%s): %s", res.peer, res.round,
                    res.stream, res.lo, res.hi, res.cause, res.error)  # fmt: skip

    def _pull_all(self, ctx: _Pull) -> None:
        """Stream every owner piece of the request in parallel into ``ctx.res``."""
        pieces = []
        # an opaque owner sends its whole segment to every sub-stream: split raw streams only
        split = self.parallel_streams if ctx.req.codec in (None, "raw") else 1
        for r in ctx.peer.ranks:
            a, b = max(ctx.req.lo, r.lo), min(ctx.req.hi, r.hi)
            if a < b:
                for k, (pa, pb_) in enumerate(split_range(a, b, split)):
                    pieces.append((r, pa, pb_, k))
        ends = [ctx.req.lo] + [
            x for _, a, b, _ in sorted(pieces, key=lambda p: p[1]) for x in (a, b)
        ]
        if ends[-1] != ctx.req.hi or any(
            ends[i] != ends[i + 1] for i in range(0, len(ends) - 1, 2)
        ):
            raise BadPayload(
                f"{ctx.peer.site}: its ranks do not tile the range", peer=ctx.peer.site
            )
        jobs = [self._pool.submit(self._pull_piece, ctx, r, a, b, k) for r, a, b, k in pieces]
        first: GossipError | None = None
        got: dict[tuple[int, int, int], ReceivedSegment] = {}
        for job in futures.as_completed(jobs):
            try:
                for seg in job.result():  # parallel sub-streams may repeat an opaque segment
                    key = (seg.rank, seg.lo, seg.hi)
                    if key in got and got[key].data != seg.data:
                        raise BadPayload(f"{ctx.peer.site}/{seg.rank}: two different segments "
                                         f"[{seg.lo},{seg.hi})", peer=ctx.peer.site)  # fmt: skip
                    got[key] = seg
            except _Cancelled:
                pass
            except Exception as e:  # noqa: BLE001 (never let a transport bug escape)
                if first is None:
                    first = e if isinstance(e, GossipError) else GossipError(
                        f"{ctx.peer.site}: {e!r}", peer=ctx.peer.site)  # fmt: skip
                    ctx.cancel_all(self._lock)
        if first is not None:
            raise first
        segs = sorted(got.values(), key=lambda s: s.lo)
        if ctx.saw_raw and segs:
            raise BadPayload(f"{ctx.peer.site}: raw and opaque segments mixed", peer=ctx.peer.site)
        for s, t in zip(segs, segs[1:], strict=False):
            if s.hi > t.lo:
                raise BadPayload(f"{ctx.peer.site}: segments [{s.lo},{s.hi}) and [{t.lo},{t.hi}) "
                                 "overlap", peer=ctx.peer.site)  # fmt: skip
        ctx.res.segments = segs

    def _pull_piece(self, ctx: _Pull, r: RankInfo, a: int, b: int, k: int) -> list[ReceivedSegment]:
        """Stream [a, b) from owner rank ``r`` into the raw buffer, or return opaque segments;
        UNAVAILABLE is retried from the first element not yet received."""
        rpc = self._rpc(ctx.req.method, self._channel(r.address, ctx.peer.site, k))
        piece = _Piece(ctx, r, a, b)
        attempt = 0
        while True:
            left = ctx.deadline - time.monotonic()
            if left <= 0:
                raise piece.last or PullTimeout(
                    f"{piece.who}: deadline passed before [{piece.nxt},{b})", peer=ctx.peer.site
                )
            call = rpc(self._request_pb(ctx.req, piece.nxt, b), timeout=left)
            start, piece.version = piece.nxt, None
            with self._lock:
                ctx.calls.append(call)
            try:
                self._read_call(ctx, piece, call)
                return piece.opaque
            except grpc.RpcError as e:
                if ctx.stop.is_set():
                    raise _Cancelled() from None
                err = piece.last = from_rpc_error(e, ctx.peer.site)
                piece.resume_point()
                if piece.nxt > start:
                    attempt = 0  # progress was made: the retry budget is per stall, not per pull
                left = ctx.deadline - time.monotonic()
                if not is_retryable(err) or left <= 0 or attempt >= self.max_retries:
                    raise err from None
                attempt += 1
                ctx.res.retries += 1
                self.metrics.add("retries")
                pause = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(min(left, pause * self._rng.uniform(0.5, 1.5)))
            finally:
                call.cancel()  # no-op when the stream completed; stops the peer on errors
                with self._lock:
                    if call in ctx.calls:
                        ctx.calls.remove(call)

    @staticmethod
    def _rpc(method: str, ch: grpc.Channel):
        request = pb.PullRequest if method == "Pull" else pb.FetchStateRequest
        return ch.unary_stream(f"/{SERVICE}/{method}", response_deserializer=identity,
                               request_serializer=request.SerializeToString)  # fmt: skip

    def _request_pb(self, req: _Request, lo: int, hi: int):
        ids = dict(run_id=self.run_id, layout_hash=self.layout_hash, lo=lo, hi=hi, site=self.site)
        if req.method == "Pull":
            return pb.PullRequest(round=req.round, stream=req.stream, **ids)
        return pb.FetchStateRequest(name=req.stream, **ids)

    def _read_call(self, ctx: _Pull, piece: _Piece, call) -> None:
        """Consume one stream: headers are checked before anything is allocated, every chunk
        against its CRC and the segment's length, every segment against its CRC."""
        for msg in call:
            if ctx.stop.is_set():
                call.cancel()
                raise _Cancelled()
            try:
                h, data, crc = decode_chunk(msg)
            except Exception as e:  # noqa: BLE001
                raise piece.bad(f"undecodable chunk: {e!r}") from e
            if h is not None:
                self._check_header(ctx, piece, h)
                piece.open(h)
            else:
                n = piece.write(data, crc)
                self.metrics.add("bytes_recv", n)
                with self._lock:
                    ctx.res.bytes_recv += n
        if piece.hdr is not None or piece.nxt < piece.b:
            raise piece.bad(f"stream ended at {piece.nxt} of [{piece.a},{piece.b})")

    def _check_header(self, ctx: _Pull, piece: _Piece, h: pb.SegmentHeader) -> None:
        """Every field of a segment header against what this pull expects, before any
        allocation: identity, round/version, codec, dtype, range and length."""
        req, r, nxt, b = ctx.req, piece.r, piece.nxt, piece.b
        if piece.hdr is not None:
            raise piece.bad("header inside a segment")
        if nxt >= b:
            raise piece.bad("a segment after the range was complete")
        bad = []
        if h.run_id != self.run_id:
            bad.append(f"run_id {h.run_id!r}")
        if h.layout_hash != self.layout_hash:
            bad.append(f"layout_hash {h.layout_hash!r}")
        if req.method == "Pull" and h.round != req.round:
            bad.append(f"round {h.round} != {req.round}")
        if h.stream != req.stream:
            bad.append(f"stream {h.stream!r}")
        if h.site != ctx.peer.site:
            bad.append(f"site {h.site!r}")
        if req.codec is not None and h.codec != req.codec:
            bad.append(f"codec {h.codec!r} != {req.codec!r}")
        elif h.codec != "raw" and ctx.raw_only:
            bad.append(f"codec {h.codec!r} where raw values were asked for")
        elif h.codec != "raw" and not _CODEC_LABEL.fullmatch(h.codec):
            bad.append(f"codec label {h.codec!r}")
        elif h.codec != "raw" and len(piece.opaque) >= MAX_SEGMENTS:
            bad.append(f"more than {MAX_SEGMENTS} opaque segments")
        if h.dtype not in ITEMSIZE:
            bad.append(f"dtype {h.dtype!r}")
        elif h.codec == "raw":
            if h.dtype != req.dtype:
                bad.append(f"dtype {h.dtype!r} != {req.dtype!r}")
            elif not (h.lo == nxt < h.hi <= b) or h.length != (h.hi - h.lo) * ITEMSIZE[req.dtype]:
                bad.append(f"raw range [{h.lo},{h.hi}) len {h.length} for next {nxt} of [..,{b})")
        elif not (max(r.lo, piece.floor) <= h.lo <= nxt < h.hi <= r.hi):
            bad.append(f"opaque range [{h.lo},{h.hi}) for next {nxt} in rank [{r.lo},{r.hi})")
        elif h.length > piece.limit(h.hi - h.lo) or h.length > piece.budget:
            bad.append(f"opaque length {h.length} for {h.hi - h.lo} values "
                       f"(at most {min(piece.limit(h.hi - h.lo), piece.budget)})")  # fmt: skip
        if req.method == "FetchState" and piece.version not in (None, h.round):
            bad.append(f"version {h.round} after {piece.version} in one stream")
        if bad:
            raise piece.bad("bad header: " + ", ".join(bad))
        if req.method == "FetchState":
            piece.version = h.round
            ctx.saw_version(h.round)
        if h.codec == "raw":
            ctx.saw_raw = True


@dataclass(frozen=True)
class _Request:
    method: str  # "Pull" or "FetchState"
    round: int
    stream: str
    lo: int
    hi: int
    dtype: str
    codec: str | None
    segment_bytes: SegmentBytes | None
    validate: Validator | None


class _Pull:
    """The shared state of one pull's parallel pieces."""

    def __init__(self, peer: PeerInfo, req: _Request, res: PullResult, deadline: float,
                 data: memoryview, raw_only: bool) -> None:  # fmt: skip
        self.peer, self.req, self.res, self.deadline = peer, req, res, deadline
        res.data = data
        self.raw_only = raw_only  # the caller's buffer takes raw values only
        self.stop = threading.Event()
        self.calls: list = []
        self.saw_raw = False  # a raw segment arrived: opaque ones may not
        self._versions: set[int] = set()
        self._vlock = threading.Lock()

    def cancel_all(self, lock: threading.Lock) -> None:
        self.stop.set()
        with lock:
            for c in self.calls:
                c.cancel()

    def saw_version(self, version: int) -> None:
        """FetchState: every header of every piece must carry one version."""
        with self._vlock:
            self._versions.add(version)
            if len(self._versions) > 1:
                raise StateMoved(
                    f"{self.peer.site}: pieces of versions {sorted(self._versions)} (torn read)",
                    peer=self.peer.site,
                )

    def version(self) -> int:
        with self._vlock:
            return next(iter(self._versions)) if self._versions else -1


class _Piece:
    """Reading state of one owner piece ``[a, b)`` across retries."""

    def __init__(self, ctx: _Pull, r: RankInfo, a: int, b: int) -> None:
        self.ctx, self.r, self.a, self.b = ctx, r, a, b
        self.who = f"{ctx.peer.site}/{r.rank}"
        self.limit = ctx.req.segment_bytes or default_segment_bytes
        # opaque bytes this piece may allocate: one segment's bound for the owner's whole range
        self.budget = self.limit(r.hi - r.lo)
        self.nxt, self.floor = a, r.lo
        self.opaque: list[ReceivedSegment] = []
        self.last: GossipError | None = None
        self.hdr: pb.SegmentHeader | None = None
        self.version: int | None = None  # FetchState: the version of the current call
        self.got = self.crc_run = 0
        self.buf: memoryview | bytearray | None = None

    def bad(self, what: str) -> BadPayload:
        return BadPayload(f"{self.who}: {what}", peer=self.ctx.peer.site)

    def open(self, h: pb.SegmentHeader) -> None:
        """Start segment ``h`` (checked): raw lands in the caller's buffer, opaque in its own."""
        self.hdr, self.got, self.crc_run = h, 0, 0
        if h.codec == "raw":
            off = (h.lo - self.ctx.req.lo) * ITEMSIZE[self.ctx.req.dtype]
            self.buf = self.ctx.res.data[off : off + h.length]
        else:
            self.budget -= h.length
            self.buf = bytearray(h.length)
        if h.length == 0:
            self.close()

    def write(self, data: memoryview, crc: int) -> int:
        """Append one data chunk to the open segment; returns its size."""
        h, n = self.hdr, len(data)
        if h is None:
            raise self.bad("data before header")
        if n == 0 or self.got + n > h.length or zlib.crc32(data) != crc:
            raise self.bad(f"chunk checksum/length mismatch in {h.stream} round {h.round}")
        self.buf[self.got : self.got + n] = data
        self.got += n
        self.crc_run = crc32_combine(self.crc_run, crc, n)
        if self.got == h.length:
            self.close()
        return n

    def close(self) -> None:
        h = self.hdr
        if self.crc_run != h.crc32:
            raise self.bad("segment checksum mismatch")
        if h.codec != "raw":
            seg = ReceivedSegment(h.lo, h.hi, h.codec, h.dtype, self.buf, self.r.rank)
            self.opaque.append(seg)
        self.nxt, self.floor, self.hdr = min(self.b, h.hi), h.hi, None

    def resume_point(self) -> None:
        """After a broken stream: raw chunks so far passed their CRC, resume after them."""
        h = self.hdr
        if h is not None and h.codec == "raw":
            self.nxt = h.lo + self.got // ITEMSIZE[self.ctx.req.dtype]
        elif h is not None:  # the unfinished opaque segment is dropped and sent again
            self.budget += h.length
        self.hdr = None
