"""One rank's range of the flat vector as it travels between sites.

A rank publishes its whole shard ``[slo, shi)`` of the padded flat vector (the values past the
model's P are zero) and pulls exactly its own range ``[lo, hi)`` (the shard clipped to P), so
sites with different rank counts still line up. A puller gets either one raw fp32 payload of
exactly ``[lo, hi)`` or one frame per owner segment of the partner's; :class:`ShardRange`
bounds what a segment may make it allocate, decodes the frames that carry no codec state
(sketches, landing offsets, raw), and assembles the segments into ``[lo, hi)``.
"""

from __future__ import annotations

import numpy as np
import torch

from loco.compress import PayloadError, make_codec
from loco.compress.wire import HEADER_SIZE
from loco.outer import lattice, offset_code, phi_sketch

LATTICE_BLOCK = 256  # values per block of a lattice phi frame (lattice.encode's default)
LOSSLESS = ("none",)


class ShardRange:
    """The shard ``(slo, shi)`` a rank publishes and the range ``(lo, hi)`` it owns (the shard
    clipped to the model's P); ``flat_size``, the padded flat size P', bounds a received
    frame's length (a partner with fewer ranks sends bigger segments, at most its whole padded
    vector)."""

    def __init__(self, shard: tuple[int, int], owned: tuple[int, int],
                 flat_size: int | None = None) -> None:  # fmt: skip
        self.slo, self.shi = shard
        self.lo, self.hi = owned
        assert self.slo <= self.lo <= self.hi <= self.shi, (shard, owned)
        self.max_numel = 2 * max(flat_size or 0, self.shi) + (1 << 20)

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shi - self.slo, dtype=torch.float32)
        out[: self.numel].copy_(x.detach().reshape(-1).float().cpu())
        return out

    def raw(self, x: torch.Tensor) -> np.ndarray:
        """``x`` on ``[lo, hi)`` as this rank's whole shard of raw fp32 (a lossless payload)."""
        return self._padded(x).numpy()

    def decode_plain(self, mv: memoryview, numel: int, *, raw: bool, sketch: bool,
                     offsets: bool) -> torch.Tensor | None:  # fmt: skip
        """A received segment of ``numel`` values in a frame without codec state: a phi sketch
        (expanded per value), a landing offset frame, or this rank's raw fp32 range; None for
        any other frame (the caller's codec). Raises PayloadError on a frame that does not fit
        its segment or claims more values than a partner may make us allocate."""
        if sketch:
            if numel > self.max_numel:
                raise PayloadError(f"sketch segment of {numel} values, more than {self.max_numel}")
            return phi_sketch.decode(mv, numel)
        if offsets:
            if numel > self.max_numel or offset_code.frame_numel(mv) != numel:
                raise PayloadError(f"offset frame for a segment of {numel} values")
            return offset_code.decode(mv, numel)
        if raw:
            if len(mv) != self.numel * 4 or numel != self.numel:
                raise PayloadError(f"raw payload of {len(mv)} bytes for {self.numel} values")
            return torch.from_numpy(np.frombuffer(mv, dtype=np.float32).copy())
        return None

    @staticmethod
    def segment_bound(codec: str, options: dict[str, object]):
        """The gossip ``segment_bytes`` bound of a stream in ``codec`` (with ``options``): the
        frame size of a segment of n values, plus 1/8 and 256 bytes for a partner whose blocks
        or scales differ a little (None for raw: the client bounds raw ranges exactly)."""
        if codec in LOSSLESS:
            return None
        if codec == "lattice":

            def exact(n: int) -> int:
                return lattice.frame_bytes(n, LATTICE_BLOCK)
        elif codec == "sketch":

            def exact(n: int) -> int:
                return phi_sketch.frame_bytes(n, LATTICE_BLOCK)
        elif codec in offset_code.NAMES:

            def exact(n: int) -> int:
                return offset_code.frame_bytes(n, offset_code.NAMES[codec])
        else:
            c = make_codec(codec, **options)

            def exact(n: int) -> int:
                return HEADER_SIZE + c.payload_nbytes(n)

        return lambda n: exact(n) + exact(n) // 8 + 256

    def assemble(self, res, values: list[torch.Tensor], stream: str) -> torch.Tensor:
        """This rank's ``[lo, hi)`` from a successful pull and the validator's decoded values.

        Raises PayloadError when a segment's length disagrees with its range, or the
        segments do not cover the range.
        """
        if not res.segments:  # raw: exactly [lo, hi)
            if len(values) != 1 or values[0].numel() != self.numel:
                raise PayloadError(f"{stream}: raw payload of wrong length")
            return values[0]
        if len(values) != len(res.segments):
            raise PayloadError(f"{stream}: {len(values)} decoded of {len(res.segments)} segments")
        out = torch.empty(self.numel, dtype=torch.float32)
        covered = 0
        for seg, val in zip(res.segments, values, strict=True):
            if val.numel() != seg.hi - seg.lo:
                raise PayloadError(
                    f"{stream}: segment [{seg.lo},{seg.hi}) decodes to {val.numel()} values"
                )
            a, b = max(seg.lo, self.lo), min(seg.hi, self.hi)
            if a < b:
                out[a - self.lo : b - self.lo].copy_(val[a - seg.lo : b - seg.lo])
                covered += b - a
        if covered != self.numel:
            raise PayloadError(f"{stream}: segments cover {covered} of {self.numel} values")
        return out
