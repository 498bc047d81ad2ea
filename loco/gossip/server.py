"""The gRPC server of one rank: Hello, long-poll Pull, FetchState, Status and grpc.health.v1.

One ``GossipServer`` per rank. Address convention: the site's ``listen`` address is rank 0's;
rank r listens on ``port + r`` of the same host, unless explicit ``rank_addresses`` are given
(tests bind port 0 and set them after ``start()``). Hello reports every rank's address and range.
Its parts: :mod:`.admission` (membership and stream caps), :mod:`.serving` (Pull and
FetchState), :mod:`.health`, :mod:`.status` (what Status reports).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from ._pb import gossip_pb2 as pb
from ._pb import health_pb2_grpc
from .admission import Admission, StreamSlots, is_loopback_host, peer_host
from .agree_rpc import KEEP_ROUNDS, ProposalBook
from .counters import GossipMetrics
from .framing import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, identity
from .health import SERVICE, HealthService
from .mailbox import Mailbox, Segment
from .options import GossipOptions
from .ranges import rank_range
from .serving import RangeService, stream_segments
from .status import member_status
from .swim_key_service import key_handler as swim_key_handler
from .tls import TlsConfig, server_credentials

log = logging.getLogger(__name__)

__all__ = ["SERVICE", "GossipServer", "StreamSlots", "is_loopback_host", "peer_host",
           "server_options", "split_address"]  # fmt: skip

# Stream caps. Worst case for one partner site: 8 ranks pulling delta and phi at once from one
# rank of ours (a 1-rank site owns every partner rank's range), each pull split into up to
# 4 parallel_streams sub-streams, and a long poll for the next round posted while the last
# streams of this one drain: 8 x 2 x 4 x 2 = 128 per peer. A triple group has two partners:
# 2 x 128 = 256 in total (a joiner's FetchState fits in what that leaves in practice).
MAX_STREAMS = GossipOptions.max_streams  # 256
MAX_STREAMS_PER_PEER = GossipOptions.max_streams_per_peer  # 128
# workers beyond the stream slots: Hello, Status, Health.Check and refusals always find a thread
UNARY_WORKERS = 16


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


def _check_options(
    who: str, listen: str, *, tls: TlsConfig | None, insecure: bool,
    allow_public_plaintext: bool, unary_workers: int, chunk_bytes: int,
) -> None:  # fmt: skip
    """ValueError for a server without TLS material nor ``insecure``, plaintext on a public
    address without ``allow_public_plaintext``, or out-of-range workers or chunk size."""
    if tls is None and not insecure:
        raise ValueError("GossipServer needs tls=TlsConfig(...) or insecure=True (plaintext)")
    if insecure and not allow_public_plaintext and not is_loopback_host(split_address(listen)[0]):
        raise ValueError(
            f"GossipServer {who}: plaintext (insecure=True) on non-loopback {listen} "
            "lets anyone who reaches it read the model; use tls=, a loopback address, or "
            "allow_public_plaintext=True (gossip.insecure_public=true)"
        )
    if unary_workers < 1:
        raise ValueError(f"unary_workers={unary_workers} must be >= 1")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")


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
        unary_workers: threads beyond ``max_streams`` for Hello, Status, Health.Check and
            refusals.

    ``status_source``: what the Status RPC answers (default: this server's own figures, see
    ``loco.gossip.status.member_status``).
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
        _check_options(
            f"{site}/{rank}", listen, tls=tls, insecure=insecure,
            allow_public_plaintext=allow_public_plaintext, unary_workers=unary_workers,
            chunk_bytes=chunk_bytes,
        )  # fmt: skip
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
        self.admission = Admission(
            tls=self.tls, members=self.members, slots=self.slots, metrics=self.metrics
        )
        # the pairing agreement: this site's proposals, settled groups, and the Pull gate
        self.agreement = ProposalBook(metrics=self.metrics, max_wait_s=max_wait_s,
                                      keep=max(KEEP_ROUNDS, keep_rounds))  # fmt: skip
        self.ranges = RangeService(
            run_id=run_id, layout_hash=layout_hash, rank=rank, lo=self.lo, hi=self.hi,
            mailbox=self.mailbox, admission=self.admission, metrics=self.metrics,
            max_wait_s=max_wait_s, stream=self._stream, agreement=self.agreement,
        )  # fmt: skip
        # what Status answers; GossipNode sets its own view (membership, pairing, per peer)
        self.status_source: Callable[[], pb.StatusResponse] | None = None
        # K(site -> caller) of the Swim.Key RPC; GossipNode sets it when SWIM runs under mTLS
        self.swim_keys: Callable[[str], bytes] | None = None
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
        self.agreement.close()
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
                self.ranges.pull,
                request_deserializer=pb.PullRequest.FromString,
                response_serializer=identity,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                self.ranges.fetch_state,
                request_deserializer=pb.FetchStateRequest.FromString,
                response_serializer=identity,
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                self._status,
                request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusResponse.SerializeToString,
            ),
            "Proposal": grpc.unary_unary_rpc_method_handler(
                self._proposal,
                request_deserializer=pb.ProposalRequest.FromString,
                response_serializer=pb.ProposalResponse.SerializeToString,
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self._server.add_generic_rpc_handlers(
            (swim_key_handler(self.admission, self.site, lambda: self.swim_keys),)
        )
        health = HealthService(self.admission, self.max_wait_s, self._stopping)
        health_pb2_grpc.add_HealthServicer_to_server(health, self._server)

    def _hello(self, req: pb.HelloRequest, context) -> pb.HelloResponse:
        self.admission.authorize(context)
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

    def _status(self, req: pb.StatusRequest, context) -> pb.StatusResponse:
        self.admission.authorize(context)
        if self.status_source is not None:
            return self.status_source()
        return member_status(self, peers=sorted((self.members or set()) - {self.site}))

    def _proposal(self, req: pb.ProposalRequest, context) -> pb.ProposalResponse:
        self.admission.authorize(context)
        self.ranges.check_run(context, req.run_id, req.layout_hash)
        return self.agreement.serve(req, context)

    def _stream(
        self, segs: list[Segment], lo: int, hi: int, round: int, stream: str, context
    ) -> Iterator[bytes]:
        """The wire messages of [lo, hi) of ``segs`` (see ``serving.stream_segments``); a
        subclass may wrap it (``loco.testing.gossip_faults.FaultyServer``)."""
        return stream_segments(
            segs, lo, hi, round, stream, run_id=self.run_id, layout_hash=self.layout_hash,
            site=self.site, rank=self.rank, metrics=self.metrics,
        )  # fmt: skip
