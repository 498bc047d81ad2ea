"""The pull side of one rank's round payloads: a partner's stream on this rank's range, checked
and decoded.

:class:`RangePulls` pulls exactly the rank's owned range ``[lo, hi)`` of a partner's stream
(:mod:`loco.outer.shard_range`: the geometry, plain frames, assembly) and decodes every segment
inside the gossip client's ``validate`` hook, so a payload that does not decode, is not finite,
or claims more values than its segment fails the pull as a bad payload (a strike) before anything
is applied. Lattice frames decode next to the rank's own coded phi of the round (``_ref``, set by
the encode side, :class:`loco.outer.exchange.RangePayloads`); what they show (failed and repaired
blocks, the partner spread on the rank's own blocks) is counted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from loco.compress import PayloadError, decode
from loco.outer import lattice, offset_code
from loco.outer.shard_range import LATTICE_BLOCK, LOSSLESS, ShardRange
from loco.outer.spread import Spread

__all__ = ["LATTICE_BLOCK", "LatticeTally", "RangePulls"]


@dataclass
class LatticeTally:
    """What one pull's lattice frames showed, one entry per frame: the blocks that failed their
    check (the receiver's own phi kept there), the blocks repaired
    (:mod:`loco.outer.lattice_repair`), the window slack on the receiver's own blocks
    (:func:`loco.outer.lattice.window_slack`), and with ``masks`` set to a list, each frame's
    per-value mask of its failed blocks (1.0: failed)."""

    failed: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    slack: list[tuple[float, float, int]] = field(default_factory=list)
    masks: list[torch.Tensor] | None = None


class RangePulls(ShardRange):
    """Pull and decode a partner's stream on this rank's range (module docstring).

    Args:
        shard, owned, flat_size: :class:`ShardRange`'s.
        codec, phi_codec: the delta's and phi's stream codecs (``lattice`` for the lattice phi).
        delta_options, phi_options: their options (the segment bounds); other streams' codecs
            come with :meth:`register_codec`.
    """

    def __init__(self, shard: tuple[int, int], owned: tuple[int, int], flat_size: int | None,
                 *, codec: str, phi_codec: str, delta_options: dict[str, object] | None = None,
                 phi_options: dict[str, object] | None = None) -> None:  # fmt: skip
        super().__init__(shard, owned, flat_size)
        self.codec, self.phi_codec = codec, phi_codec
        self.delta_options = dict(delta_options or {})
        self.phi_options = dict(phi_options or {})
        self.extra_options: dict[str, dict[str, object]] = {}  # codecs of other streams
        self.spread = Spread()
        self.lattice_blocks = self.lattice_failed = 0  # decoded blocks, and how many failed
        self._lock = threading.Lock()
        self._ref: torch.Tensor | None = None  # own exact phi of the round (lattice decoding)

    def register_codec(self, codec: str, options: dict[str, object]) -> None:
        """Options of one more stream's codec (the landing's offsets), for encoding it and for
        the pull's segment bound; the delta's codec keeps its own options."""
        if codec != self.codec:
            self.extra_options[codec] = dict(options)

    def _options(self, codec: str) -> dict[str, object]:
        if codec == self.codec:
            return self.delta_options
        return self.extra_options.get(codec, self.phi_options)

    def validator(self, sink: list[torch.Tensor], raw: bool, lattice_ref=None,
                  tally: LatticeTally | None = None, *, sketch: bool = False,
                  offsets: bool = False):  # fmt: skip
        """A gossip ``validate`` callable ``check(buf, numel, lo)``: decode each received payload
        of ``numel`` values, the first at flat index ``lo`` (raw: check it is finite fp32 of the
        right length; a frame may not claim more values than its segment; lattice: decoded as
        that segment next to ``lattice_ref``, what each frame showed going to ``tally``), append
        the values to ``sink``; raise on anything bad so the gossip client counts a strike and
        fails the pull. ``sketch``: a phi sketch frame (:mod:`loco.outer.phi_sketch`), expanded
        per value; ``offsets``: a landing offset frame (:mod:`loco.outer.offset_code`)."""
        tally = tally if tally is not None else LatticeTally()

        def check(buf, numel: int, seg_lo: int) -> None:
            mv = memoryview(buf).cast("B")
            if lattice_ref is not None:
                t = self._decode_lattice(mv, numel, seg_lo, lattice_ref, tally)
            else:
                t = self.decode_plain(mv, numel, raw=raw, sketch=sketch, offsets=offsets)
            if t is None:
                t = decode(mv, max_numel=min(numel, self.max_numel)).float()
            if not bool(torch.isfinite(t).all()):
                raise PayloadError("payload holds NaN/Inf")
            sink.append(t)

        return check

    def _decode_lattice(self, mv: memoryview, numel: int, seg_lo: int, ref: torch.Tensor,
                        tally: LatticeTally) -> torch.Tensor:  # fmt: skip
        """A partner's lattice frame of the segment ``[seg_lo, seg_lo + numel)``, its values;
        :func:`loco.outer.lattice.decode_segment`."""
        seg = lattice.decode_segment(mv, numel, seg_lo, ref, shard=(self.slo, self.shi),
                                     owned=(self.lo, self.hi), max_numel=self.max_numel)  # fmt: skip
        with self._lock:
            if seg.own:  # a partner's spread on our own blocks: the window of our next frame
                self.spread.observe(seg.decoded)
            self.lattice_blocks += seg.blocks
            self.lattice_failed += seg.failed
        tally.failed.append(seg.failed)
        tally.repaired.append(seg.decoded.repaired)
        if seg.own:
            tally.slack.append(lattice.window_slack(seg.decoded))
        if tally.masks is not None:  # per value: 1 where the block failed (own phi kept)
            tally.masks.append(seg.bad)
        return seg.decoded.values

    def segment_bytes(self, codec: str):
        """The gossip ``segment_bytes`` bound of a stream in ``codec`` under this site's
        settings (:meth:`ShardRange.segment_bound`)."""
        return self.segment_bound(codec, self._options(codec))

    def pull(self, node, partner: str, round: int, stream: str, timeout_s: float | None = None,
             codec: str | None = None, failed_out: list[torch.Tensor] | None = None):  # fmt: skip
        """Pull and decode ``partner``'s ``stream`` on ``[lo, hi)`` (``codec``: the stream's
        own by default; ``"none"`` for a :meth:`raw` payload). ``failed_out`` (lattice): gets
        the bool mask on ``[lo, hi)`` of the values whose block failed its check.

        Returns ``(tensor, "")`` or ``(None, cause)``; never raises for remote faults.
        """
        values: list[torch.Tensor] = []
        tally = LatticeTally(masks=[] if failed_out is not None else None)
        if codec is None:
            codec = self.codec if stream == "delta" else self.phi_codec
        ref = self._ref if codec == "lattice" else None
        check = self.validator(values, codec in LOSSLESS, ref, tally, sketch=codec == "sketch",
                               offsets=codec in offset_code.NAMES)  # fmt: skip
        kw: dict[str, object] = {
            "validate": check,
            "codec": "raw" if codec in LOSSLESS else codec,
            "segment_bytes": self.segment_bytes(codec),
        }
        if timeout_s is not None:
            kw["timeout_s"] = timeout_s
        if self.numel == 0:  # a trailing rank whose shard is all padding owns nothing
            return torch.zeros(0), ""
        # the owned range, not the shard: a partner's padded size may end before our shard
        res = node.pull(partner, round, stream, lo=self.lo, hi=self.hi, **kw)
        if not res.ok:
            return None, res.cause
        if sum(tally.failed):  # blocks outside the window: our own phi there, no pull on them
            node.count_failure("lattice_blocks", sum(tally.failed))
        if sum(tally.repaired):  # blocks where a few wrapped values were moved back
            node.count("repaired_lattice_blocks", sum(tally.repaired))
        if tally.slack:  # how much wider than the partner's distance its windows were, in bits
            node.count("window_slack_bits", sum(b for b, _, _ in tally.slack))
            node.count("window_slack_sq", sum(q for _, q, _ in tally.slack))
            node.count("window_slack_blocks", sum(c for _, _, c in tally.slack))
        try:
            out = self.assemble(res, values, stream)
            if failed_out is not None and tally.masks is not None:
                failed_out.append(self.assemble(res, tally.masks, stream) > 0.5 if tally.masks
                                  else torch.zeros(self.numel, dtype=torch.bool))  # fmt: skip
            return out, ""
        except PayloadError as e:
            node.reject(partner, round, "bad_payload", f"{stream} does not assemble: {e}")
            return None, "bad_payload"
