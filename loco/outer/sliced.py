"""DiLoCo's mean as a reduce-scatter then an all-gather (``outer.diloco_reduce=sliced``).

With ``full`` every site pulls every other site's whole delta: ``(n - 1) S`` bytes in per site
and round for a delta of ``S`` bytes. ``sliced`` moves ``2 (n - 1) / n S``, as a ring
all-reduce does, over the same mailbox and range pulls:

1. The round's members (the live sites, sorted by name) cut the flat space ``[0, P)`` into
   ``n`` contiguous slices; slice ``k`` belongs to the ``k``-th member. Every rank publishes its
   delta as one codec frame per piece of a slice inside its owned range (stream ``delta``), so a
   range pull of one slice receives that slice only.
2. The owner of slice ``k`` pulls slice ``k`` of every other member's delta, averages the
   DECODED values (its own included) in site order, encodes the average with the mean codec
   (``compression.mean_codec``, by default the delta's; with ``compression.mean_error_feedback``
   the owner carries the average's coding error into its next average) and publishes it (stream ``dmean``) behind a small header naming the members it averaged.
3. Every site pulls the other ``n - 1`` slice averages and applies the outer step on the
   assembled mean. The owner applies its own DECODED average too, so every site applies
   bitwise the same mean and phi stays equal everywhere.

Fallback: a slice whose average cannot be had (pull error, timeout, bad frame, another view
of the members, implausible values) is averaged by the site itself from range pulls of that
slice of every other member's delta (counted as ``fail_slice_fallback``). A site missing from
an average it uses is counted as ``fail_slice_without_own``. Sites then agree wherever they
got the same averages; a site that falls back while the others did not applies a mean that
differs from theirs by the average's re-quantization (the full reduce has the same limit: a
site that misses a partner's pull averages fewer members).

The ``dmean`` frame: ``b"LSM1"``, the CRC-32 of the member names (the view), the member
count ``n`` (u16) and an ``n``-bit mask of the members averaged, then a ``loco.compress``
frame (codec ``none`` when the mean codec is ``none``). Every field is checked before use.
"""

from __future__ import annotations

import logging
import struct
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from loco.compress import ErrorFeedback, PayloadError, decode, encode, make_codec
from loco.compress.wire import HEADER_SIZE
from loco.errors import TrainingError
from loco.outer.exchange import LOSSLESS, Outgoing, RangePayloads
from loco.outer.plausible import implausible

log = logging.getLogger("loco.outer.loop")

REDUCES = ("sliced", "full")
MEAN_STREAM = "dmean"
MAGIC = b"LSM1"
PREFIX = struct.Struct("<4sIH")  # magic, CRC-32 of the member names, member count
MAX_MEMBERS = 4096  # bounds the member mask a frame may carry (512 bytes)


@dataclass
class SlicedOptions:
    """``outer.diloco_reduce``: how DiLoCo's all-site mean travels.

    ``sliced``: reduce-scatter then all-gather, ``2 (n - 1) / n`` deltas in per site;
    ``full``: every site pulls every other site's whole delta, ``n - 1`` deltas in.
    """

    diloco_reduce: str = "sliced"


def slice_bounds(P: int, n: int, k: int, base: int = 0) -> tuple[int, int]:
    """Slice ``k`` of ``n`` of the space ``[base, base + P)`` (the flat space, or a fragment)."""
    return base + k * P // n, base + (k + 1) * P // n


def pieces(P: int, n: int, lo: int, hi: int, base: int = 0) -> list[tuple[int, int, int]]:
    """``(k, a, b)``: the non-empty part ``[a, b)`` of each slice ``k`` of
    ``[base, base + P)`` inside ``[lo, hi)``."""
    out = []
    for k in range(n):
        s0, s1 = slice_bounds(P, n, k, base)
        a, b = max(lo, s0), min(hi, s1)
        if a < b:
            out.append((k, a, b))
    return out


def view_crc(members: list[str]) -> int:
    """The CRC-32 of a round's sorted member names: equal iff two sites see the same members."""
    return zlib.crc32("\n".join(members).encode())


def pack_mean(members: list[str], averaged: list[str], frame: Any) -> bytes:
    """The ``dmean`` frame of an average over ``averaged`` (a subset of ``members``)."""
    mask = bytearray((len(members) + 7) // 8)
    for i, m in enumerate(members):
        if m in averaged:
            mask[i // 8] |= 1 << (i % 8)
    head = PREFIX.pack(MAGIC, view_crc(members), len(members))
    return head + bytes(mask) + memoryview(frame).cast("B").tobytes()


class OtherView(Exception):
    """A well-formed slice average over another set of members (a membership change seen by
    one site a round before another): not used, and no strike."""


def pack_marker(members: list[str]) -> bytes:
    """A ``dmean`` frame without values: "no average of mine here" under this view."""
    return PREFIX.pack(MAGIC, view_crc(members), len(members)) + bytes((len(members) + 7) // 8)


def unpack_mean(buf: Any, members: list[str], max_numel: int) -> tuple[torch.Tensor, set[str]]:
    """The values and the averaged members of a ``dmean`` frame. PayloadError when its header
    is malformed or its frame does not decode; :class:`OtherView` when it is over other
    members."""
    mv = memoryview(buf).cast("B")
    n = len(members)
    if len(mv) < PREFIX.size:
        raise PayloadError(f"slice average of {len(mv)} bytes: shorter than its header")
    magic, crc, count = PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise PayloadError("slice average: bad magic")
    if count > MAX_MEMBERS:
        raise PayloadError(f"slice average over {count} members (at most {MAX_MEMBERS})")
    if count != n or crc != view_crc(members):
        raise OtherView(f"slice average over another view of the members ({count} of them)")
    end = PREFIX.size + (n + 7) // 8
    if len(mv) < end:
        raise PayloadError("slice average: truncated member mask")
    mask = bytes(mv[PREFIX.size : end])
    if n % 8 and mask[-1] >> (n % 8):
        raise PayloadError("slice average: member mask names more members than the view")
    if len(mv) == end:  # a marker under our own view: that range is not the owner's slice
        raise PayloadError("slice average asked of a range outside its owner's slice")
    got = {m for i, m in enumerate(members) if mask[i // 8] >> (i % 8) & 1}
    values = decode(mv[end:], max_numel=max_numel).float()
    if not bool(torch.isfinite(values).all()):
        raise PayloadError("slice average holds NaN/Inf")
    return values, got


def piece_payloads(parent: RangePayloads, a: int, b: int) -> RangePayloads:
    """A decoder of ``[a, b)`` with ``parent``'s delta codec and bounds (pulls only)."""
    p = RangePayloads(shard=(a, b), owned=(a, b), codec=parent.codec,
                      delta_options=parent.delta_options, mean_codec=parent.mean_codec,
                      mean_options=parent.mean_options, error_feedback=False,
                      mean_error_feedback=parent.mean_error_feedback)  # fmt: skip
    p.max_numel = parent.max_numel
    return p


class SlicedReduce:
    """The sliced all-site mean of one rank (see the module docstring).

    Args:
        node: the rank's ``GossipNode``; payloads: its :class:`RangePayloads` (codec, error
            feedback residual, bounds); site: this site's name; P: the size of the space
            reduced, ``[base, base + P)``: the model's flat space (``base`` 0), or with
            streaming fragments the fragment's (``loco.outer.fragments``).
        pool: the pull threads; pull_timeout_s: deadline of one pull (None: the node's). A
            slice average is waited for twice that (its owner pulls first).
    """

    def __init__(self, *, node: Any, payloads: RangePayloads, site: str, P: int, pool: Any,
                 pull_timeout_s: float | None, base: int = 0) -> None:  # fmt: skip
        self.node, self.payloads, self.site, self.P, self.base = node, payloads, site, P, base
        self.pool, self.pull_timeout_s = pool, pull_timeout_s
        self.lo, self.hi, self.slo = payloads.lo, payloads.hi, payloads.slo
        self._mean_ef: ErrorFeedback | None = None  # the owner's residual of its average
        self._mean_ef_at: tuple[int, int] | None = None

    def expected_pulls(self, partners: list[str]) -> int:
        """The pulls of this rank the partners owe for a round at least: one of its delta per
        partner whose slice meets its range, one of its average per partner if it has one."""
        members = sorted({*partners, self.site})
        owned = {k for k, _, _ in pieces(self.P, len(members), self.lo, self.hi, self.base)}
        mine = members.index(self.site) in owned
        return sum(members.index(p) in owned for p in partners) + (len(partners) if mine else 0)

    # ------------------------------------------------------------------ publish

    def publish(self, rid: int, round: int, delta: torch.Tensor, phi: torch.Tensor,
                members: list[str]) -> Outgoing:  # fmt: skip
        """Encode this rank's delta piece by piece of the members' slices and publish it as
        gossip round ``rid``; the record holds the DECODED delta on ``[lo, hi)``."""
        if not bool(torch.isfinite(delta).all()) or not bool(torch.isfinite(phi).all()):
            raise TrainingError("the local delta or phi holds NaN/Inf; refusing to publish it")
        x = delta.detach().reshape(-1).float().cpu()
        own = torch.empty(self.hi - self.lo, dtype=torch.float32)
        segs, bufs, nbytes = [], [], 0
        ef = self.payloads.ef
        for k, a, b in pieces(self.P, len(members), self.lo, self.hi, self.base):
            buf, label, val = self._encode(k, x[a - self.lo : b - self.lo], a, b)
            own[a - self.lo : b - self.lo].copy_(val)
            segs.append(self._segment(a, b, buf, label))
            bufs.append(buf)
            nbytes += memoryview(buf).nbytes
        if ef is not None:
            ef.calls += 1
        if segs:
            self.node.publish(rid, "delta", None, segments=segs)
        return Outgoing(round, own, phi.clone(), tuple(bufs), nbytes)

    def _encode(self, k: int, x: torch.Tensor, a: int, b: int) -> tuple[Any, str, torch.Tensor]:
        """(buffer, codec label, decoded values) of the piece ``[a, b)`` of slice ``k``."""
        p = self.payloads
        if p.codec in LOSSLESS:
            buf = x.clone().numpy()
            return buf, "raw", torch.from_numpy(buf)
        if p.ef is not None:  # the piece's encoder updates its part of the rank's residual
            ef = ErrorFeedback(p.codec, b - a, decay=p.ef.decay, **p.delta_options)
            ef.residual = p.ef.residual[a - self.slo : b - self.slo]
            ef.seed, ef.calls = p.ef.seed ^ (k * 0x9E3779B1 & 0xFFFFFFFF), p.ef.calls
            buf = ef.encode(x)
        else:
            buf = encode(x, p.codec, **p.delta_options)
        return buf, p.codec, decode(buf).float()

    def _segment(self, a: int, b: int, buf: Any, label: str):
        from loco.gossip import Segment

        return Segment.make(a, b, buf, codec=label, grid_bytes=self.node.server.chunk_bytes)

    # ------------------------------------------------------------------ reduce

    def run(self, rid: int, own: torch.Tensor, phi: torch.Tensor, partners: list[str]):
        """Reduce-scatter and all-gather round ``rid``. Returns ``(mean, used)``: the assembled
        mean on ``[lo, hi)`` and, per partner, ``""`` when its delta is in every average this
        rank used, else the cause."""
        if not partners:  # alone: the local step on the once-decoded delta, as ``full``
            return own.clone(), {}
        members = sorted({*partners, self.site})
        n, me = len(members), members.index(self.site)
        mean = torch.empty(self.hi - self.lo, dtype=torch.float32)
        missing: dict[str, str] = {}
        cut = pieces(self.P, n, self.lo, self.hi, self.base)
        mine = [(k, a, b) for k, a, b in cut if k == me]
        jobs = {a: self._pull_deltas(rid, a, b, partners) for _, a, b in mine}
        others = [(k, a, b) for k, a, b in cut if k != me]
        means = {a: self.pool.submit(self._pull_mean, rid, members[k], a, b, members)
                 for k, a, b in others}  # fmt: skip
        piece = None
        for _, a, b in mine:  # at most one: a slice meets a range in one piece
            got = self._collect(rid, jobs[a], missing, own, phi, a, b)
            frame = self._encode_mean(self._average(own, a, b, got), a, b)
            piece = (a, b, pack_mean(members, sorted([self.site, *got]), frame))
            mean[a - self.lo : b - self.lo].copy_(decode(frame).float())
        self._publish_mean(rid, members, piece)
        for k, a, b in others:
            val, averaged, cause = means[a].result()
            if val is not None:
                val, cause = self._plausible(rid, members[k], val, own, phi, a, b)
            if val is None:
                log.warning("round %d: slice %d average from %s not used (%s); averaging it "
                            "here", rid, k, members[k], cause)  # fmt: skip
                self.node.count_failure("slice_fallback")
                jobs_k = self._pull_deltas(rid, a, b, partners)
                got = self._collect(rid, jobs_k, missing, own, phi, a, b)
                val, averaged = self._average(own, a, b, got), {self.site, *got}
            elif self.site not in averaged:
                self.node.count_failure("slice_without_own")
            for p in partners:
                if p not in averaged:
                    missing.setdefault(p, f"not in slice {k}")
            mean[a - self.lo : b - self.lo].copy_(val)
        return mean, {p: missing.get(p, "") for p in partners}

    def _publish_mean(self, rid: int, members: list[str], piece: tuple | None) -> None:
        """Publish this rank's average ``piece`` ``(a, b, dmean frame)`` and a marker over
        the rest of its range: whatever range a puller of another view asks for is covered
        (it reads the marker's view and falls back; no strike)."""
        if self.lo >= self.hi:
            return
        a, b = (piece[0], piece[1]) if piece is not None else (self.hi, self.hi)
        label, marker = f"avg.{self.payloads.mean_codec}", pack_marker(members)
        segs = [self._segment(x, y, marker, label)
                for x, y in ((self.lo, a), (b, self.hi)) if x < y]  # fmt: skip
        if piece is not None:
            segs.append(self._segment(a, b, piece[2], label))
        self.node.publish(rid, MEAN_STREAM, None, segments=segs)

    def _pull_deltas(self, rid: int, a: int, b: int, partners: list[str]) -> dict[str, Future]:
        dec = piece_payloads(self.payloads, a, b)
        return {p: self.pool.submit(dec.pull, self.node, p, rid, "delta", self.pull_timeout_s)
                for p in partners}  # fmt: skip

    def _collect(self, rid: int, jobs: dict[str, Future], missing: dict[str, str],
                 own: torch.Tensor, phi: torch.Tensor, a: int, b: int) -> dict[str, torch.Tensor]:  # fmt: skip
        """The plausible pieces that came, by partner; the others' causes go to ``missing``."""
        got = {}
        for p in sorted(jobs):
            d, cause = jobs[p].result()
            if d is not None:
                d, cause = self._plausible(rid, p, d, own, phi, a, b)
            if d is None:
                missing.setdefault(p, cause)
                log.warning("round %d: partner %s's piece [%d, %d) dropped (%s)", rid, p, a, b,
                            cause)  # fmt: skip
            else:
                got[p] = d
        return got

    def _average(self, own: torch.Tensor, a: int, b: int, got: dict[str, torch.Tensor]):
        """The mean over this site's decoded piece and ``got``, in site order."""
        rows = {self.site: own[a - self.lo : b - self.lo], **got}
        return torch.stack([rows[s] for s in sorted(rows)]).mean(0)

    def _encode_mean(self, val: torch.Tensor, a: int, b: int) -> Any:
        """The frame of this owner's average on ``[a, b)``. With ``mean_error_feedback`` the
        owner keeps the average's coding error and adds it to its next average of the same
        piece (a piece that moves, on a change of the members, starts from zero)."""
        p = self.payloads
        if p.mean_codec in LOSSLESS:
            return encode(val, "none")
        if not p.mean_error_feedback:
            return encode(val, p.mean_codec, **p.mean_options)
        if self._mean_ef is None or self._mean_ef_at != (a, b):
            self._mean_ef = ErrorFeedback(p.mean_codec, b - a, **p.mean_options)
            self._mean_ef_at = (a, b)
        return self._mean_ef.encode(val)

    def _mean_bytes(self):
        """The ``segment_bytes`` bound of a ``dmean`` segment of n values."""
        p = self.payloads
        c = make_codec("none" if p.mean_codec in LOSSLESS else p.mean_codec,
                       **({} if p.mean_codec in LOSSLESS else p.mean_options))  # fmt: skip
        extra = PREFIX.size + (MAX_MEMBERS + 7) // 8 + HEADER_SIZE
        return lambda n: extra + c.payload_nbytes(n) * 9 // 8 + 256

    def _pull_mean(self, rid: int, owner: str, a: int, b: int, members: list[str]):
        """``(values, averaged members, "")`` of ``owner``'s average on ``[a, b)``, or
        ``(None, None, cause)``; never raises for remote faults."""
        values: list[torch.Tensor] = []
        sets: list[set[str]] = []
        other: list[str] = []
        dec = piece_payloads(self.payloads, a, b)

        def check(buf, numel: int, lo: int) -> None:
            try:
                v, got = unpack_mean(buf, members, min(numel, dec.max_numel))
            except OtherView as e:  # not the owner's fault: nothing of it is used
                other.append(str(e))
                return
            values.append(v)
            sets.append(got)

        timeout = 2 * (self.pull_timeout_s or self.node.client.timeout_s)
        res = self.node.pull(owner, rid, MEAN_STREAM, lo=a, hi=b, validate=check,
                             codec=f"avg.{self.payloads.mean_codec}",
                             segment_bytes=self._mean_bytes(), timeout_s=timeout)  # fmt: skip
        if not res.ok:
            return None, None, res.cause
        if other:
            self.node.count_failure("slice_other_view")
            return None, None, "other_view"
        try:
            val = dec.assemble(res, values, MEAN_STREAM)
        except PayloadError as e:
            self.node.reject(owner, rid, "bad_payload", f"{MEAN_STREAM} does not assemble: {e}")
            return None, None, "bad_payload"
        return val, set.intersection(*sets) if sets else set(), ""

    def _plausible(self, rid: int, owner: str, val: torch.Tensor, own: torch.Tensor,
                   phi: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor | None, str]:  # fmt: skip
        ph = phi[a - self.lo : b - self.lo]
        bad = implausible(val, ph, own[a - self.lo : b - self.lo], ph)
        if not bad:
            return val, ""
        log.warning("round %d: %s sent an implausible slice: %s", rid, owner, bad)
        self.node.reject(owner, rid, "implausible", f"implausible payload: {bad}")
        return None, "implausible"
