"""One reader of segment streams for Pull and FetchState: owner pieces in parallel, every
header checked before anything is allocated, every chunk and segment against its CRC.

``StreamReader`` works for a :class:`~loco.gossip.client.GossipClient` (its channels, pool,
identity, retry policy and counters); ``Request`` says what is pulled, ``PullState`` is shared by
the parallel pieces of one pull, ``Piece`` is the reading state of one owner piece.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ._pb import gossip_pb2 as pb
from .errors import BadPayload, GossipError, PullTimeout, StateMoved, from_rpc_error, is_retryable
from .framing import ITEMSIZE, crc32_combine, decode_chunk, identity
from .ranges import split_range
from .records import (
    PeerInfo,
    PullResult,
    RankInfo,
    ReceivedSegment,
    SegmentBytes,
    Validator,
    default_segment_bytes,
)
from .server import SERVICE

if TYPE_CHECKING:
    from .client import GossipClient

MAX_SEGMENTS = 1024  # opaque segments one owner piece may send (an honest owner sends one)
_CODEC_LABEL = re.compile(r"[a-z][a-z0-9_.-]{0,31}")  # an opaque codec label (never "raw")


class Cancelled(Exception):
    """A piece stopped because another piece of the same pull failed."""


class StreamReader:
    """Streams the owner pieces of one pull for ``client`` (see the module docstring)."""

    def __init__(self, client: GossipClient) -> None:
        self.client = client

    def pull_all(self, ctx: PullState) -> None:
        """Stream every owner piece of the request in parallel into ``ctx.res``."""
        pieces = []
        # an opaque owner sends its whole segment to every sub-stream: split raw streams only
        split = self.client.parallel_streams if ctx.req.codec in (None, "raw") else 1
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
        jobs = [
            self.client._pool.submit(self._pull_piece, ctx, r, a, b, k) for r, a, b, k in pieces
        ]
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
            except Cancelled:
                pass
            except Exception as e:  # noqa: BLE001 (never let a transport bug escape)
                if first is None:
                    first = e if isinstance(e, GossipError) else GossipError(
                        f"{ctx.peer.site}: {e!r}", peer=ctx.peer.site)  # fmt: skip
                    ctx.cancel_all(self.client._lock)
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

    def _pull_piece(
        self, ctx: PullState, r: RankInfo, a: int, b: int, k: int
    ) -> list[ReceivedSegment]:
        """Stream [a, b) from owner rank ``r`` into the raw buffer, or return opaque segments;
        UNAVAILABLE is retried from the first element not yet received."""
        rpc = self._rpc(ctx.req.method, self.client._channel(r.address, ctx.peer.site, k))
        piece = Piece(ctx, r, a, b)
        attempt = 0
        while True:
            left = ctx.deadline - time.monotonic()
            if left <= 0:
                raise piece.last or PullTimeout(
                    f"{piece.who}: deadline passed before [{piece.nxt},{b})", peer=ctx.peer.site
                )
            call = rpc(self._request_pb(ctx.req, piece.nxt, b), timeout=left)
            start, piece.version = piece.nxt, None
            with self.client._lock:
                ctx.calls.append(call)
            try:
                self._read_call(ctx, piece, call)
                return piece.opaque
            except grpc.RpcError as e:
                if ctx.stop.is_set():
                    raise Cancelled() from None
                err = piece.last = from_rpc_error(e, ctx.peer.site)
                piece.resume_point()
                if piece.nxt > start:
                    attempt = 0  # progress was made: the retry budget is per stall, not per pull
                left = ctx.deadline - time.monotonic()
                if not is_retryable(err) or left <= 0 or attempt >= self.client.max_retries:
                    raise err from None
                attempt += 1
                ctx.res.retries += 1
                self.client.metrics.add("retries")
                pause = min(self.client.backoff_max_s, self.client.backoff_s * 2 ** (attempt - 1))
                time.sleep(min(left, pause * self.client._rng.uniform(0.5, 1.5)))
            finally:
                call.cancel()  # no-op when the stream completed; stops the peer on errors
                with self.client._lock:
                    if call in ctx.calls:
                        ctx.calls.remove(call)

    @staticmethod
    def _rpc(method: str, ch: grpc.Channel):
        request = pb.PullRequest if method == "Pull" else pb.FetchStateRequest
        return ch.unary_stream(f"/{SERVICE}/{method}", response_deserializer=identity,
                               request_serializer=request.SerializeToString)  # fmt: skip

    def _request_pb(self, req: Request, lo: int, hi: int):
        ids = dict(
            run_id=self.client.run_id,
            layout_hash=self.client.layout_hash,
            lo=lo,
            hi=hi,
            site=self.client.site,
        )
        if req.method == "Pull":
            return pb.PullRequest(round=req.round, stream=req.stream, **ids)
        return pb.FetchStateRequest(name=req.stream, **ids)

    def _read_call(self, ctx: PullState, piece: Piece, call) -> None:
        """Consume one stream: headers are checked before anything is allocated, every chunk
        against its CRC and the segment's length, every segment against its CRC."""
        for msg in call:
            if ctx.stop.is_set():
                call.cancel()
                raise Cancelled()
            try:
                h, data, crc = decode_chunk(msg)
            except Exception as e:  # noqa: BLE001
                raise piece.bad(f"undecodable chunk: {e!r}") from e
            if h is not None:
                self._check_header(ctx, piece, h)
                piece.open(h)
            else:
                n = piece.write(data, crc)
                self.client.metrics.add("bytes_recv", n)
                with self.client._lock:
                    ctx.res.bytes_recv += n
        if piece.hdr is not None or piece.nxt < piece.b:
            raise piece.bad(f"stream ended at {piece.nxt} of [{piece.a},{piece.b})")

    def _check_header(self, ctx: PullState, piece: Piece, h: pb.SegmentHeader) -> None:
        """Every field of a segment header against what this pull expects, before any
        allocation: identity, round/version, codec, dtype, range and length."""
        req, r, nxt, b = ctx.req, piece.r, piece.nxt, piece.b
        if piece.hdr is not None:
            raise piece.bad("header inside a segment")
        if nxt >= b:
            raise piece.bad("a segment after the range was complete")
        bad = []
        if h.run_id != self.client.run_id:
            bad.append(f"run_id {h.run_id!r}")
        if h.layout_hash != self.client.layout_hash:
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
class Request:
    method: str  # "Pull" or "FetchState"
    round: int
    stream: str
    lo: int
    hi: int
    dtype: str
    codec: str | None
    segment_bytes: SegmentBytes | None
    validate: Validator | None


class PullState:
    """The shared state of one pull's parallel pieces."""

    def __init__(self, peer: PeerInfo, req: Request, res: PullResult, deadline: float,
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


class Piece:
    """Reading state of one owner piece ``[a, b)`` across retries."""

    def __init__(self, ctx: PullState, r: RankInfo, a: int, b: int) -> None:
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
