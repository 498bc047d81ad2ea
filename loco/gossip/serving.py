"""Serving ranges of published payloads: the Pull and FetchState handlers of one rank.

A request is checked (membership, run and layout, range inside the rank), holds a stream slot
for its whole life, and is answered by a header and data chunks per segment that intersects it
(:func:`stream_segments`); raw segments are sliced to the range, opaque ones are sent whole.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import grpc

from ._pb import gossip_pb2 as pb
from .admission import Admission
from .agree_rpc import ProposalBook
from .counters import GossipMetrics
from .framing import crc32_combine, decode_chunk, encode_data, encode_header
from .mailbox import Mailbox, RoundEvictedError, Segment

StreamFn = Callable[..., Iterator[bytes]]
"""``stream(segs, lo, hi, round, stream, context)``: the wire messages of a range."""


def stream_segments(
    segs: list[Segment], lo: int, hi: int, round: int, stream: str, *, run_id: str,
    layout_hash: str, site: str, rank: int, metrics: GossipMetrics,
) -> Iterator[bytes]:  # fmt: skip
    """Header + data chunks for every segment intersecting [lo, hi); raw ones are sliced.
    Each data chunk is counted in ``bytes_sent`` before it is handed over."""
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
            run_id=run_id, layout_hash=layout_hash, round=round, stream=stream,
            codec=seg.codec, dtype=seg.dtype, lo=s_lo, hi=s_hi, length=b1 - b0, crc32=crc,
            site=site, rank=rank,
        )  # fmt: skip
        yield encode_header(header)
        for p0, p1, c in plan:
            msg = encode_data(seg.data[p0:p1], c)
            metrics.add("bytes_sent", p1 - p0)
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


class RangeService:
    """Pull (long poll for a round) and FetchState (latest state) of one rank.

    Args:
        run_id, layout_hash: requests with other values are refused (FAILED_PRECONDITION).
        rank, lo, hi: the rank and its flat range; a request outside it is INVALID_ARGUMENT.
        mailbox: what is published.
        admission: membership and stream caps.
        metrics: ``served_*`` counters, and per caller ``bytes_sent``.
        max_wait_s: longest long-poll wait, whatever the caller's deadline.
        stream: :data:`StreamFn` that writes a range (the server's, which a subclass may wrap).
        agreement: the pairing agreement's gate (None: every admitted caller is served).
    """

    def __init__(
        self, *, run_id: str, layout_hash: str, rank: int, lo: int, hi: int, mailbox: Mailbox,
        admission: Admission, metrics: GossipMetrics, max_wait_s: float, stream: StreamFn,
        agreement: ProposalBook | None = None,
    ) -> None:  # fmt: skip
        self.run_id, self.layout_hash = run_id, layout_hash
        self.rank, self.lo, self.hi = rank, lo, hi
        self.mailbox, self.admission, self.metrics = mailbox, admission, metrics
        self.max_wait_s = max_wait_s
        self._stream = stream
        self.agreement = agreement

    def pull(self, req: pb.PullRequest, context) -> Iterator[bytes]:
        site = self.admission.authorize(context)
        self.check_run(context, req.run_id, req.layout_hash)
        self._check_range(context, req.lo, req.hi)
        release = self.admission.hold(context, site)
        try:
            if self.agreement is not None:  # the caller: its certificate's name, or its claim
                self.agreement.admit(context, req.round, req.stream, site or req.site)
            msgs = self._serve_pull(req, context)
            yield from self._counted(msgs, self.admission.caller(site, req.site))
        finally:
            release()

    def fetch_state(self, req: pb.FetchStateRequest, context) -> Iterator[bytes]:
        site = self.admission.authorize(context)
        self.check_run(context, req.run_id, req.layout_hash)
        self._check_range(context, req.lo, req.hi)
        got = self.mailbox.state(req.name)
        if got is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no state {req.name!r} published")
        version, segs = got
        release = self.admission.hold(context, site)
        try:
            msgs = self._stream(segs, req.lo, req.hi, version, req.name, context)
            yield from self._counted(msgs, self.admission.caller(site, req.site))
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

    def _counted(self, msgs: Iterator[bytes], caller: str) -> Iterator[bytes]:
        """``msgs``, with the data bytes handed over counted under ``caller`` (if any)."""
        if not caller:
            yield from msgs
            return
        for msg in msgs:
            if msg[:1] == b"\x12":  # a data chunk (a header starts with field 1)
                _, data, _ = decode_chunk(msg)
                self.metrics.add_peer(caller, "bytes_sent", len(data))
            yield msg

    def check_run(self, context, run_id: str, layout_hash: str) -> None:
        if run_id != self.run_id or layout_hash != self.layout_hash:
            self.metrics.add("served_fail_mismatch")
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run/layout mismatch: server has run_id={self.run_id!r} "
                f"layout_hash={self.layout_hash!r}, request run_id={run_id!r} "
                f"layout_hash={layout_hash!r}",
            )

    def _check_range(self, context, lo: int, hi: int) -> None:
        if not (self.lo <= lo < hi <= self.hi):
            self.metrics.add("served_fail_bad_request")
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"range [{lo},{hi}) not inside rank {self.rank}'s [{self.lo},{self.hi})",
            )
