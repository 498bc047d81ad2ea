"""A hostile gossip member: a real mTLS gRPC server of ``loco.v1.Gossip`` with scripted answers.

It holds a valid member certificate of the run CA, so the puller's TLS and membership checks
pass; what it says is up to the test. Each RPC is answered by a callable (all three have an
honest default, the answer ``GossipServer`` would give for the same layout):

- ``hello(req: pb.HelloRequest) -> pb.HelloResponse``
- ``pull(req: pb.PullRequest) -> Iterable[bytes | Stall | Abort]``
- ``fetch_state(req: pb.FetchStateRequest) -> Iterable[bytes | Stall | Abort]``

Stream items are wire messages (see :func:`segment_messages`), or a :class:`Stall` (send
nothing for a while; ends early when the caller goes away) or an :class:`Abort` (end the call
with a status code), which a callable may also raise. The member claims ``nproc`` ranks that
all listen on its one address. ``served`` counts what it answered.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from loco.gossip._pb import gossip_pb2 as pb
from loco.gossip.framing import (
    DEFAULT_CHUNK_BYTES,
    ITEMSIZE,
    PROTOCOL_VERSION,
    crc32_combine,
    encode_data,
    encode_header,
    identity,
)
from loco.gossip.ranges import rank_range
from loco.gossip.server import SERVICE
from loco.gossip.tls import TlsConfig, server_credentials

HelloFn = Callable[[pb.HelloRequest], pb.HelloResponse]
StreamFn = Callable[[object], Iterable[object]]
SEND_LIMIT = 64 << 20  # a hostile member may send messages larger than the protocol allows


def site_tls(cert_dir: str | Path, site: str) -> TlsConfig:
    """``site``'s mTLS material from ``loco.certs.write_run_certs(cert_dir, ...)`` output, in
    either layout: per-site bundles ``cert_dir/<site>/{ca.pem,<site>.pem,<site>.key}`` or the
    flat ``cert_dir/{ca.pem,<site>.pem,<site>.key}``."""
    d = Path(cert_dir)
    return TlsConfig.for_site(d / site if (d / site).is_dir() else d, site)


@dataclass(frozen=True)
class Stall:
    """Stream item: send nothing for ``seconds`` (or until the caller cancels)."""

    seconds: float


class Abort(Exception):
    """Stream item (or exception from a callable): end the call with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str = "hostile member") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def honest_hello(
    *,
    site: str,
    run_id: str,
    layout_hash: str,
    flat_size: int,
    nproc: int,
    address: str,
    current_round: int = 0,
    rank: int = 0,
) -> pb.HelloResponse:
    """The Hello of a well-behaved site whose ``nproc`` ranks all listen on ``address``."""
    ranks = []
    for r in range(nproc):
        lo, hi = rank_range(flat_size, nproc, r)
        ranks.append(pb.RankInfo(rank=r, address=address, lo=lo, hi=hi))
    return pb.HelloResponse(
        run_id=run_id, protocol_version=PROTOCOL_VERSION, layout_hash=layout_hash, site=site,
        nproc=nproc, flat_size=flat_size, ranks=ranks, current_round=current_round, rank=rank,
    )  # fmt: skip


def segment_header(
    lo: int,
    hi: int,
    data: bytes,
    *,
    codec: str = "raw",
    dtype: str = "float32",
    round: int,
    stream: str,
    site: str,
    run_id: str,
    layout_hash: str,
    rank: int = 0,
) -> pb.SegmentHeader:
    """The honest header of segment ``[lo, hi)`` holding ``data``: its length and crc32."""
    return pb.SegmentHeader(
        run_id=run_id, layout_hash=layout_hash, round=round, stream=stream, codec=codec,
        dtype=dtype, lo=lo, hi=hi, length=len(data), crc32=zlib.crc32(data), site=site, rank=rank,
    )  # fmt: skip


def data_messages(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """``data`` as honest ``Chunk{data, crc32}`` wire messages of ``chunk_bytes`` at most."""
    mv = memoryview(data)
    return [encode_data(mv[i : i + chunk_bytes]) for i in range(0, len(mv), chunk_bytes)]


def segment_messages(
    lo: int,
    hi: int,
    data: bytes,
    *,
    codec: str = "raw",
    dtype: str = "float32",
    round: int,
    stream: str,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    site: str,
    run_id: str,
    layout_hash: str,
    rank: int = 0,
) -> list[bytes]:
    """One honest segment on the wire: its header message, then its data chunks."""
    h = segment_header(lo, hi, data, codec=codec, dtype=dtype, round=round, stream=stream,
                       site=site, run_id=run_id, layout_hash=layout_hash, rank=rank)  # fmt: skip
    return [encode_header(h), *data_messages(data, chunk_bytes)]


def repeated_segment(
    header: pb.SegmentHeader, block: bytes, nbytes: int, *, chunk_bytes: int | None = None
) -> Iterator[bytes]:
    """A segment of ``nbytes`` made of ``block`` repeated (the last piece cut), streamed
    without holding it: ``header`` gets its length and crc32 set. For large-size cases."""
    chunk_bytes = chunk_bytes or len(block)
    block = (block * (-(-chunk_bytes // len(block))))[:chunk_bytes]
    full_crc = zlib.crc32(block)
    crc, left = 0, nbytes
    while left:
        n = min(left, chunk_bytes)
        crc = crc32_combine(crc, full_crc if n == chunk_bytes else zlib.crc32(block[:n]), n)
        left -= n
    header.length, header.crc32 = nbytes, crc
    yield encode_header(header)
    left = nbytes
    while left:
        n = min(left, chunk_bytes)
        yield encode_data(memoryview(block)[:n], full_crc if n == chunk_bytes else None)
        left -= n


class HostileMember:
    """A gossip member with a valid certificate whose answers are scripted (see module doc).

    Args:
        site, run_id, layout_hash, flat_size, nproc: what the honest defaults claim.
        tls: its mTLS material (e.g. ``site_tls(dir, site)``); or ``insecure=True``.
        hello, pull, fetch_state: the answer callables (None: honest default). They may be
            replaced on the instance (``member.pull = ...``) between calls.
        payload: the flat vector the honest defaults serve (``flat_size * itemsize`` bytes of
            ``dtype``); None serves zeros.
        chunk_bytes: data bytes per message of the honest defaults.
        current_round, state_version: what the honest Hello and FetchState report.
    """

    def __init__(
        self,
        *,
        site: str,
        run_id: str,
        layout_hash: str,
        flat_size: int,
        nproc: int = 1,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        hello: HelloFn | None = None,
        pull: StreamFn | None = None,
        fetch_state: StreamFn | None = None,
        payload: bytes | None = None,
        dtype: str = "float32",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        current_round: int = 0,
        state_version: int = 0,
        listen: str = "127.0.0.1:0",
        max_workers: int = 16,
    ) -> None:
        if tls is None and not insecure:
            raise ValueError("HostileMember needs tls=... or insecure=True")
        self.site, self.run_id, self.layout_hash = site, run_id, layout_hash
        self.flat_size, self.nproc, self.dtype = flat_size, nproc, dtype
        self.tls, self.payload, self.chunk_bytes = tls, payload, chunk_bytes
        self.current_round, self.state_version = current_round, state_version
        self.hello: HelloFn = hello or self.honest_hello
        self.pull: StreamFn = pull or self.honest_pull
        self.fetch_state: StreamFn = fetch_state or self.honest_fetch_state
        self.served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listen, self.port = listen, 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="hostile-member"),
            options=[("grpc.max_send_message_length", SEND_LIMIT), ("grpc.so_reuseport", 0)],
        )
        self._add_handlers()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Bind and serve; returns the address (``host:port``)."""
        if self.tls is None:
            self.port = self._server.add_insecure_port(self._listen)
        else:
            self.port = self._server.add_secure_port(self._listen, server_credentials(self.tls))
        if self.port == 0:
            raise OSError(f"could not bind {self._listen}")
        self._server.start()
        return self.address

    @property
    def address(self) -> str:
        return f"{self._listen.rpartition(':')[0]}:{self.port}"

    def stop(self) -> None:
        """Stop at once; stalled answers end."""
        self._stopping.set()
        self._server.stop(0).wait(5)

    def __enter__(self) -> HostileMember:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- honest answers

    def honest_hello(self, req: pb.HelloRequest | None = None) -> pb.HelloResponse:
        """What a well-behaved site of this layout answers to Hello."""
        return honest_hello(site=self.site, run_id=self.run_id, layout_hash=self.layout_hash,
                            flat_size=self.flat_size, nproc=self.nproc, address=self.address,
                            current_round=self.current_round)  # fmt: skip

    def honest_segments(self, lo: int, hi: int, round: int, stream: str) -> list[bytes]:
        """Raw segments of ``payload`` for ``[lo, hi)``, one per claimed rank it meets."""
        out: list[bytes] = []
        size = ITEMSIZE[self.dtype]
        for r in range(self.nproc):
            rlo, rhi = rank_range(self.flat_size, self.nproc, r)
            a, b = max(lo, rlo), min(hi, rhi)
            if a >= b:
                continue
            data = self.payload[a * size : b * size] if self.payload else bytes((b - a) * size)
            out += segment_messages(
                a, b, data, dtype=self.dtype, round=round, stream=stream, rank=r,
                chunk_bytes=self.chunk_bytes, site=self.site, run_id=self.run_id,
                layout_hash=self.layout_hash,
            )  # fmt: skip
        return out

    def honest_pull(self, req: pb.PullRequest) -> list[bytes]:
        return self.honest_segments(req.lo, req.hi, req.round, req.stream)

    def honest_fetch_state(self, req: pb.FetchStateRequest) -> list[bytes]:
        return self.honest_segments(req.lo, req.hi, self.state_version, req.name)

    # ---------------------------------------------------------------- serving

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.served[key] += n

    def _add_handlers(self) -> None:
        handlers = {
            "Hello": grpc.unary_unary_rpc_method_handler(
                self._on_hello,
                request_deserializer=pb.HelloRequest.FromString,
                response_serializer=pb.HelloResponse.SerializeToString,
            ),
            "Pull": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: self._on_stream("pull", self.pull, req, ctx),
                request_deserializer=pb.PullRequest.FromString,
                response_serializer=identity,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: self._on_stream("fetch_state", self.fetch_state, req, ctx),
                request_deserializer=pb.FetchStateRequest.FromString,
                response_serializer=identity,
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )

    def _on_hello(self, req: pb.HelloRequest, context) -> pb.HelloResponse:
        self._count("hello")
        try:
            return self.hello(req)
        except Abort as a:
            self._count("aborts")
            context.abort(a.code, a.details)

    def _on_stream(self, kind: str, fn: StreamFn, req, context) -> Iterator[bytes]:
        self._count(kind)
        try:
            for item in fn(req):
                if isinstance(item, Abort):
                    raise item
                if isinstance(item, Stall):
                    self._count("stalls")
                    self._stall(item.seconds, context)
                    continue
                self._count("messages")
                self._count("bytes", len(item))
                yield item
        except Abort as a:
            self._count("aborts")
            context.abort(a.code, a.details)

    def _stall(self, seconds: float, context) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and context.is_active() and not self._stopping.is_set():
            time.sleep(0.02)
