"""The gRPC server of one rank: Hello, long-poll Pull, FetchState and grpc.health.v1.

One ``GossipServer`` per rank. Address convention: the site's ``listen`` address is rank 0's;
rank r listens on ``port + r`` of the same host, unless explicit ``rank_addresses`` are given
(tests bind port 0 and set them after ``start()``). Hello reports every rank's address and range.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from ._pb import gossip_pb2 as pb
from ._pb import health_pb2, health_pb2_grpc
from .counters import GossipMetrics
from .framing import (
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    crc32_combine,
    encode_data,
    encode_header,
    identity,
)
from .mailbox import Mailbox, RoundEvictedError, Segment
from .options import GossipOptions
from .ranges import rank_range
from .tls import TlsConfig, peer_site, server_credentials

log = logging.getLogger(__name__)

SERVICE = "loco.v1.Gossip"

# Stream caps. Worst case for one partner site: 8 ranks pulling delta and phi at once from one
# rank of ours (a 1-rank site owns every partner rank's range), each pull split into up to
# 4 parallel_streams sub-streams, and a long poll for the next round posted while the last
# streams of this one drain: 8 x 2 x 4 x 2 = 128 per peer. A triple group has two partners:
# 2 x 128 = 256 in total (a joiner's FetchState fits in what that leaves in practice).
MAX_STREAMS = GossipOptions.max_streams  # 256
MAX_STREAMS_PER_PEER = GossipOptions.max_streams_per_peer  # 128
# workers beyond the stream slots: Hello, Health.Check and refusals always find a free thread
UNARY_WORKERS = 16


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


def server_options(keepalive_s: float = GossipOptions.keepalive_s) -> list[tuple[str, int]]:
    """Channel args of the server: message limits, keepalive, no port sharing."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class GossipServer:
    """Mailbox server of one rank.

    Args:
        site, rank, nproc, flat_size: identity and layout of this rank (range from ``rank_range``).
        run_id, layout_hash: requests with other values are refused (FAILED_PRECONDITION).
        listen: ``host:port`` to bind (port 0 picks a free port; see ``address``).
        tls: mTLS material; required unless ``insecure=True`` (then plaintext, only on a
            loopback host unless ``allow_public_plaintext=True``; ValueError otherwise).
        members: site names allowed to call (checked against the peer certificate); None = any
            certificate of the run CA.
        rank_addresses: addresses of all ranks of this site; default host:(port + r).
        chunk_bytes: data bytes per stream message (<= 4 MiB) for payloads published with
            ``data=``; explicit segments are chunked on their own ``grid_bytes``.
        keep_rounds: rounds kept in the mailbox.
        max_wait_s: longest long-poll wait (and Health.Watch stream), whatever the caller's
            deadline.
        max_streams, max_streams_per_peer: concurrent streaming RPCs (Pull, FetchState,
            Health.Watch) in total and per peer site (authenticated name; in plaintext, per peer
            host); one over a cap is refused at once with RESOURCE_EXHAUSTED (``PeerBusy``).
        unary_workers: threads beyond ``max_streams`` for Hello, Health.Check and refusals.
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
        listen: str = "127.0.0.1:0",
        tls: TlsConfig | None = None,
        insecure: bool = False,
        members: list[str] | None = None,
        rank_addresses: list[str] | None = None,
        chunk_bytes: int = GossipOptions.chunk_bytes,
        keep_rounds: int = GossipOptions.keep_rounds,
        max_wait_s: float = GossipOptions.max_wait_s,
        max_streams: int = MAX_STREAMS,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        unary_workers: int = UNARY_WORKERS,
        allow_public_plaintext: bool = False,
        keepalive_s: float = GossipOptions.keepalive_s,
        metrics: GossipMetrics | None = None,
    ) -> None:
        if tls is None and not insecure:
            raise ValueError("GossipServer needs tls=TlsConfig(...) or insecure=True (plaintext)")
        if (
            insecure
            and not allow_public_plaintext
            and not is_loopback_host(split_address(listen)[0])
        ):
            raise ValueError(
                f"GossipServer {site}/{rank}: plaintext (insecure=True) on non-loopback {listen} "
                "lets anyone who reaches it read the model; use tls=, a loopback address, or "
                "allow_public_plaintext=True (gossip.insecure_public=true)"
            )
        if unary_workers < 1:
            raise ValueError(f"unary_workers={unary_workers} must be >= 1")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")
        self.site, self.rank, self.nproc, self.flat_size = site, rank, nproc, flat_size
        self.lo, self.hi = rank_range(flat_size, nproc, rank)
        self.run_id, self.layout_hash = run_id, layout_hash
        self.tls = None if insecure else tls
        self.members = set(members) if members is not None else None
        self.chunk_bytes = chunk_bytes
        self.max_wait_s = max_wait_s
        self.metrics = metrics or GossipMetrics()
        self.mailbox = Mailbox(keep_rounds)
        self.slots = StreamSlots(max_streams, max_streams_per_peer)
        self._stopping = threading.Event()
        self._listen = listen
        self._rank_addresses = rank_addresses
        # every stream slot holds one worker for its whole life: the pool has unary_workers more
        pool = futures.ThreadPoolExecutor(
            max_workers=max_streams + unary_workers, thread_name_prefix="gossip-srv"
        )
        self._server = grpc.server(pool, options=server_options(keepalive_s))
        self._add_handlers()
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Bind (unless :meth:`bind` did) and start serving; returns the bound port."""
        self.bind()
        self._server.start()
        return self.port

    def bind(self) -> int:
        """Bind the port without serving yet (``address`` is then known); idempotent."""
        if self.port:
            return self.port
        host, _ = split_address(self._listen)
        if self.tls is None:
            public = not is_loopback_host(host)
            log.log(
                logging.WARNING if public else logging.INFO,
                "gossip server %s/%d serves PLAINTEXT, unauthenticated, on %s",
                self.site, self.rank, self._listen,
            )  # fmt: skip
            self.port = self._server.add_insecure_port(self._listen)
        else:
            self.port = self._server.add_secure_port(self._listen, server_credentials(self.tls))
        if self.port == 0:
            raise OSError(f"could not bind {self._listen}")
        return self.port

    @property
    def address(self) -> str:
        host, _ = split_address(self._listen)
        return f"{host}:{self.port}"

    def set_rank_addresses(self, addresses: list[str]) -> None:
        """Addresses of all ranks of this site, reported by Hello."""
        if len(addresses) != self.nproc:
            raise ValueError(f"need {self.nproc} addresses, got {len(addresses)}")
        self._rank_addresses = list(addresses)

    def rank_addresses(self) -> list[str]:
        if self._rank_addresses is not None:
            return self._rank_addresses
        host, port = split_address(self._listen)
        base = (self.port or port) - self.rank
        return [f"{host}:{base + r}" for r in range(self.nproc)]

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; waiting long polls and Health.Watch streams are woken and end."""
        self._stopping.set()
        self.mailbox.close()
        self._server.stop(grace).wait(timeout=(grace or 0) + 5)

    def __enter__(self) -> GossipServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- publishing

    def publish(
        self,
        round: int,
        stream: str,
        data=None,
        *,
        codec: str = "raw",
        dtype: str = "float32",
        segments: list[Segment] | None = None,
    ) -> None:
        """Publish this rank's payload of ``stream`` for ``round``.

        Either ``data`` (bytes-like, covering this rank's whole range [lo, hi); not copied, do
        not mutate it until the round is evicted) or explicit ``segments`` inside [lo, hi).
        """
        self.mailbox.publish(round, stream, self._segments(data, codec, dtype, segments))

    def publish_state(
        self,
        name: str,
        version: int,
        data=None,
        *,
        codec: str = "raw",
        dtype: str = "float32",
        segments: list[Segment] | None = None,
    ) -> None:
        """Publish the latest state stream ``name`` (served to joining sites by FetchState)."""
        self.mailbox.publish_state(name, version, self._segments(data, codec, dtype, segments))

    def _segments(self, data, codec, dtype, segments) -> list[Segment]:
        if segments is None:
            if data is None:
                raise ValueError("publish needs data or segments")
            segments = [Segment.make(self.lo, self.hi, data, codec, dtype, self.chunk_bytes)]
        for s in segments:
            if s.lo < self.lo or s.hi > self.hi:
                raise ValueError(
                    f"segment [{s.lo},{s.hi}) outside rank range [{self.lo},{self.hi})"
                )
        return segments

    # ---------------------------------------------------------------- handlers

    def _add_handlers(self) -> None:
        handlers = {
            "Hello": grpc.unary_unary_rpc_method_handler(
                self._hello,
                request_deserializer=pb.HelloRequest.FromString,
                response_serializer=pb.HelloResponse.SerializeToString,
            ),
            "Pull": grpc.unary_stream_rpc_method_handler(
                self._pull,
                request_deserializer=pb.PullRequest.FromString,
                response_serializer=identity,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                self._fetch_state,
                request_deserializer=pb.FetchStateRequest.FromString,
                response_serializer=identity,
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(_Health(self), self._server)

    def _authorize(self, context: grpc.ServicerContext) -> str:
        """The caller's site; aborts PERMISSION_DENIED for a non-member certificate."""
        if self.tls is None:
            return ""
        site = peer_site(context)
        if site is None or (self.members is not None and site not in self.members):
            self.metrics.add("served_fail_auth")
            log.warning("refused peer %s (site %r not a member)", context.peer(), site)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"site {site!r} is not a member")
        return site

    def _hold(self, context: grpc.ServicerContext, site: str) -> Callable[[], None]:
        """A stream slot of the caller (its site, or in plaintext its host), released when the
        RPC ends; aborts RESOURCE_EXHAUSTED at once when a cap is full."""
        got = self.slots.acquire(site or peer_host(context.peer()))
        if isinstance(got, str):
            self.metrics.add("served_fail_busy")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"busy: {got}; retry later")
        context.add_callback(got)  # backstop: the handler's own finally releases it first
        return got

    def _check_run(self, context, run_id: str, layout_hash: str) -> None:
        if run_id != self.run_id or layout_hash != self.layout_hash:
            self.metrics.add("served_fail_mismatch")
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run/layout mismatch: server has run_id={self.run_id!r} "
                f"layout_hash={self.layout_hash!r}, request run_id={run_id!r} "
                f"layout_hash={layout_hash!r}",
            )

    def _hello(self, req: pb.HelloRequest, context) -> pb.HelloResponse:
        self._authorize(context)
        ranks = [
            pb.RankInfo(
                rank=r,
                address=a,
                lo=rank_range(self.flat_size, self.nproc, r)[0],
                hi=rank_range(self.flat_size, self.nproc, r)[1],
            )
            for r, a in enumerate(self.rank_addresses())
        ]
        return pb.HelloResponse(
            run_id=self.run_id,
            protocol_version=PROTOCOL_VERSION,
            layout_hash=self.layout_hash,
            site=self.site,
            nproc=self.nproc,
            flat_size=self.flat_size,
            ranks=ranks,
            current_round=self.mailbox.latest_round,
            rank=self.rank,
        )

    def _check_range(self, context, lo: int, hi: int) -> None:
        if not (self.lo <= lo < hi <= self.hi):
            self.metrics.add("served_fail_bad_request")
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"range [{lo},{hi}) not inside rank {self.rank}'s [{self.lo},{self.hi})",
            )

    def _pull(self, req: pb.PullRequest, context) -> Iterator[bytes]:
        site = self._authorize(context)
        self._check_run(context, req.run_id, req.layout_hash)
        self._check_range(context, req.lo, req.hi)
        release = self._hold(context, site)
        try:
            yield from self._serve_pull(req, context)
        finally:
            release()

    def _serve_pull(self, req: pb.PullRequest, context) -> Iterator[bytes]:
        left = context.time_remaining()
        timeout = self.max_wait_s if left is None else min(left, self.max_wait_s)
        try:
            segs = self.mailbox.wait(req.round, req.stream, timeout, context.is_active)
        except RoundEvictedError as e:
            self.metrics.add("served_fail_evicted")
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if segs is None:
            self.metrics.add("served_fail_timeout")
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"round {req.round} stream {req.stream!r} not published in time",
            )
        self.metrics.add("served_pulls")
        yield from self._stream(segs, req.lo, req.hi, req.round, req.stream, context)

    def _fetch_state(self, req: pb.FetchStateRequest, context) -> Iterator[bytes]:
        site = self._authorize(context)
        self._check_run(context, req.run_id, req.layout_hash)
        self._check_range(context, req.lo, req.hi)
        got = self.mailbox.state(req.name)
        if got is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no state {req.name!r} published")
        version, segs = got
        release = self._hold(context, site)
        try:
            yield from self._stream(segs, req.lo, req.hi, version, req.name, context)
        finally:
            release()

    def _watch_health(self, status: int, context) -> Iterator[health_pb2.HealthCheckResponse]:
        """Health.Watch: the status, then nothing until the caller leaves, its deadline, the
        server stops or ``max_wait_s`` passes; the stream then ends OK (callers re-Watch)."""
        release = self._hold(context, self._authorize(context))
        try:
            yield health_pb2.HealthCheckResponse(status=status)
            left = context.time_remaining()
            end = time.monotonic() + (
                self.max_wait_s if left is None else min(left, self.max_wait_s)
            )
            while context.is_active() and not self._stopping.is_set():
                wait = end - time.monotonic()
                if wait <= 0:
                    break
                self._stopping.wait(min(wait, 0.25))
        finally:
            release()

    def _stream(
        self, segs: list[Segment], lo: int, hi: int, round: int, stream: str, context
    ) -> Iterator[bytes]:
        """Header + data chunks for every segment intersecting [lo, hi); raw ones are sliced."""
        for seg in segs:
            a, b = max(lo, seg.lo), min(hi, seg.hi)
            if a >= b:
                continue
            if seg.codec == "raw":
                b0, b1, s_lo, s_hi = (a - seg.lo) * seg.itemsize, (b - seg.lo) * seg.itemsize, a, b
            else:
                b0, b1, s_lo, s_hi = 0, len(seg.data), seg.lo, seg.hi
            plan = _chunk_plan(seg, b0, b1)
            crc = 0
            for p0, p1, c in plan:
                crc = crc32_combine(crc, c, p1 - p0)
            header = pb.SegmentHeader(
                run_id=self.run_id, layout_hash=self.layout_hash, round=round, stream=stream,
                codec=seg.codec, dtype=seg.dtype, lo=s_lo, hi=s_hi, length=b1 - b0, crc32=crc,
                site=self.site, rank=self.rank,
            )  # fmt: skip
            yield encode_header(header)
            for p0, p1, c in plan:
                msg = encode_data(seg.data[p0:p1], c)
                self.metrics.add("bytes_sent", p1 - p0)
                yield msg


def _chunk_plan(seg: Segment, b0: int, b1: int) -> list[tuple[int, int, int]]:
    """Chunks ``(start, end, crc32)`` of bytes [b0, b1) of ``seg``, cut on its CRC grid.

    Whole grid blocks reuse the CRC computed at publish; only a partial first or last block
    is checksummed again.
    """
    g, n = seg.grid_bytes, len(seg.data)
    out = []
    pos = b0
    while pos < b1:
        k = pos // g
        end = min(b1, (k + 1) * g)
        if pos == k * g and end == min(n, (k + 1) * g) and k < len(seg.grid):
            out.append((pos, end, seg.grid[k]))
        else:
            out.append((pos, end, zlib.crc32(seg.data[pos:end])))
        pos = end
    return out


class _Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING for "" and loco.v1.Gossip while the server runs. Members only
    (like every RPC); Watch holds a stream slot and ends after at most ``max_wait_s``."""

    _known = ("", SERVICE)

    def __init__(self, server: GossipServer) -> None:
        self._srv = server

    def Check(self, request, context):  # noqa: N802 (gRPC naming)
        self._srv._authorize(context)
        if request.service not in self._known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def Watch(self, request, context):  # noqa: N802
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if request.service in self._known
            else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        )
        yield from self._srv._watch_health(status, context)
