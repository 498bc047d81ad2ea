"""A sketch of phi that sizes the sequential landing's lattice window for THIS round's partner.

The lattice window of the landing's leader (``loco.outer.landing``) must cover how far the
followers' phi is from its own on every block. Past partners say little about a new one (a
pair that met last round is bitwise equal; the next partner may be far), so with
``outer.phi_landing_window=sketch`` every member publishes, with its delta, one random-sign
projection of its coded phi per lattice block: ``S_b = sum_i sign(i) * phi_i`` over the block's
values, ``sign`` a fixed hash of the value's flat index (so any rank count computes the same
signs). For two members, ``S_b - S'_b`` is a random-sign sum of their differences on the block:
its square has mean ``||phi_b - phi'_b||^2``. One sample per block is noisy, so the leader pools
``GROUP`` neighbouring blocks (the same tensor, mostly) into one rms estimate per value and sets
each block's window to ``margin`` times that rms (:func:`steps_from_sketches`).

Frame (little-endian): ``b"LSKT"``, version u8 (3), 3 pad bytes, numel u64, block u32, nblocks
u32, scale fp32 (finite, > 0), values fp16[nblocks] (each block's projection over ``scale``),
CRC-32 of everything before it (u32). ``1 <= block <= MAX_BLOCK`` and
``nblocks = ceil(numel / block)``: 2 bytes per block (0.008 bytes per value at block 256).
The scale puts the largest projection at 2**15, inside fp16's range; fp16's 11 bits put a
projection within 2**-11 of itself, where a difference between two sites' projections is
a chi-square sample of one degree (noise of its own size). Version 2 sent fp32 values.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from loco.compress import PayloadError
from loco.outer import lattice
from loco.outer.index_hash import splitmix
from loco.outer.lattice import MAX_BLOCK, REL_FLOOR, _bf16, _blocks, _pad, momentum_window

# 2: signs from splitmix64 (version 1's were balanced per block); 3: fp16 values, a frame scale
MAGIC, VERSION = b"LSKT", 3
_HEAD = struct.Struct("<4sB3xQIIf")
_TOP = 2.0**15  # the largest projection's fp16 value
GROUP = 16  # blocks pooled into one rms estimate (16 samples: about +-18% at one sd)
_SIGN_SEED = 0x9E3779B97F4A7C15  # added to the index before the mix (version 1 multiplied by it)


def signs(lo: int, n: int) -> torch.Tensor:
    """The projection's sign (+-1.0, fp32) of flat indices ``[lo, lo + n)``: the top bit of
    :func:`loco.outer.index_hash.splitmix` of the index (the same on every site and every rank
    count). The signs of neighbouring indices are independent, so a block's signs sum like
    coin flips; version 1's multiplicative hash gave low-discrepancy bits whose sums over a
    block stay near 0, and so a sketch blind to a difference even over a block (a shifted row)."""
    bit = (splitmix(lo, n, _SIGN_SEED) >> np.uint64(63)).astype(np.float32)
    return torch.from_numpy(1.0 - 2.0 * bit)


def sketch(phi: torch.Tensor, sgn: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of ``block`` values, the sum of ``phi`` times ``sgn`` (fp32)."""
    return _pad(phi.float() * sgn, block).sum(1)


def encode(phi: torch.Tensor, sgn: torch.Tensor, block: int) -> bytes:
    """The sketch frame of ``phi`` (its signs ``sgn``, same length). ValueError if ``phi`` holds
    NaN/Inf or ``block`` is out of range."""
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block={block}; use 1 <= block <= {MAX_BLOCK}")
    x = phi.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("phi holds NaN/Inf; refusing to sketch it")
    return frame(sketch(x, sgn, block), x.numel(), block)


def frame(s: torch.Tensor, numel: int, block: int) -> bytes:
    """The frame of a sketch ``s`` (per block, from :func:`sketch`, finite) of ``numel``
    values."""
    v = s.detach().double().numpy()
    scale = np.float32(float(np.abs(v).max()) / _TOP if v.size else 0.0)
    if not 0 < scale < np.inf:  # all zero or below fp32's range (an inf sum: refused on decode)
        scale = np.float32(1.0)
    vals = (v / float(scale)).astype("<f2")
    body = _HEAD.pack(MAGIC, VERSION, numel, block, s.numel(), scale) + vals.tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def frame_bytes(numel: int, block: int) -> int:
    """The size of a sketch frame of ``numel`` values in blocks of ``block``."""
    return _HEAD.size + 2 * _blocks(numel, block) + 4


def decode(buf: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
    """A sketch frame of a segment of ``numel`` values, expanded per value: value ``i`` holds
    its block's projection (so a puller can slice it like any stream).

    Raises:
        PayloadError: wrong magic, version, block, block count, numel (not the segment's),
            length or CRC, or values that are not finite.
    """
    mv = memoryview(buf).cast("B")
    if len(mv) < _HEAD.size + 4:
        raise PayloadError(f"sketch frame of {len(mv)} bytes is too short")
    magic, ver, n, block, nb, scale = _HEAD.unpack_from(mv)
    if magic != MAGIC or ver != VERSION:
        raise PayloadError(f"not a phi sketch frame of version {VERSION}")
    if n != numel or not 1 <= block <= MAX_BLOCK or nb != _blocks(n, block):
        raise PayloadError(f"bad sketch header: numel {n} for {numel}, block {block}, blocks {nb}")
    if len(mv) != frame_bytes(n, block):
        raise PayloadError(
            f"sketch frame of {len(mv)} bytes, header implies {frame_bytes(n, block)}"
        )
    (crc,) = struct.unpack_from("<I", mv, len(mv) - 4)
    if zlib.crc32(mv[:-4]) != crc:
        raise PayloadError("sketch frame checksum mismatch")
    if not (math.isfinite(scale) and scale > 0):
        raise PayloadError(f"sketch scale {scale} is not finite and positive")
    half = np.frombuffer(mv, "<f2", nb, _HEAD.size)
    s = torch.from_numpy(half.astype(np.float32)) * np.float32(scale)
    if not bool(torch.isfinite(s).all()):
        raise PayloadError("sketch values are not finite")
    return s.repeat_interleave(block)[:n].clone()


def steps_from_sketches(phi: torch.Tensor, own: torch.Tensor, others: list[torch.Tensor],
                        bits: int, block: int, margin: float,
                        momentum: torch.Tensor, cap: torch.Tensor | None = None,
                        per_block: bool = False) -> torch.Tensor:  # fmt: skip
    """The lattice step of every block of ``phi`` (the leader's padded coded phi) whose window
    (``2**(bits-1) - 1`` steps either side) covers ``margin`` times the estimated rms
    difference per value to the farthest follower: ``own`` is the leader's per-block sketch,
    ``others`` the followers' (per block, same length). The window is at most ``cap`` (per
    block; None: the 8-bit momentum rule's, ``lattice.CAP`` times the block's largest
    outer-momentum value, padded like ``phi``): a follower's sketch can widen the leader's
    grid, and so its coding error, no further than that. At least the lattice's floor
    ``max|phi| / 4096``. ``per_block``: the rms pooled over ``GROUP`` blocks or the block's own
    one-sample estimate, whichever is wider (a block far from its neighbours)."""
    nb = own.numel()
    d2 = torch.stack([(o.float() - own.float()).pow(2) for o in others]).amax(0)
    d2 = torch.nan_to_num(d2, nan=float("inf"))
    counts = torch.full((_blocks(nb, GROUP),), float(GROUP))
    counts[-1] = nb - GROUP * (counts.numel() - 1)  # the last group may be short
    mean = _pad(d2, GROUP).sum(1) / counts
    rms = (mean / block).sqrt().repeat_interleave(GROUP)[:nb]  # per value
    if per_block:
        rms = torch.maximum(rms, (d2 / block).sqrt())
    half = float(2 ** (bits - 1) - 1) if bits > 1 else 0.5
    floor = _pad(phi.float(), block).abs().amax(1) * REL_FLOOR
    if cap is None:
        cap = momentum_window(momentum, block)
    s = torch.maximum(torch.minimum(margin * rms, cap) / half, floor)
    return _bf16(torch.clamp(s, min=1e-30))


FINAL_MARGIN = 32.0  # the final frame: the window covers 32x the rms difference (a step of 1/4)
FINAL_CAP = 2.0  # ...at most 2x the block's largest weight either side


def final_steps(x: torch.Tensor, momentum: torch.Tensor, own: torch.Tensor,
                others: list[torch.Tensor], block: int, bits: int = 8) -> torch.Tensor:  # fmt: skip
    """The grid step of every block of the final average's frame of ``x`` (the sender's padded
    weights): the momentum rule's (:func:`lattice.steps_for`), widened where the peers'
    per-block sketches (``others``; ``own`` the sender's) show the weights farther apart than
    it covers, to ``FINAL_MARGIN`` times the estimated rms difference to the farthest peer,
    pooled over ``GROUP`` blocks or the block's own estimate, whichever is wider. The momentum
    says how far a round moves the weights, not how far apart sites that stepped alone, or met
    others, have drifted; a rarely trained row (an embedding) can sit 17x the rms from a peer,
    so the margin is wide. A peer's sketch widens the grid, and so the frame's coding error, at
    most to ``FINAL_CAP`` times the block's largest weight either side."""
    rule = lattice.steps_for(x, momentum, block, bits=bits)
    if not others:
        return rule
    cap = FINAL_CAP * _pad(x.float(), block).abs().amax(1)
    seen = steps_from_sketches(x, own, others, bits, block, FINAL_MARGIN, momentum, cap=cap,
                               per_block=True)  # fmt: skip
    return torch.maximum(rule, seen)


SCALE_RANGE = 2.0**-8, 2.0**8  # the most a round's sketches rescale the remembered spread
SCALE_SD = 3.0  # the scale is taken this many of its estimate's sds high
SCALE_MIN_BLOCKS = 100  # fewer blocks with a difference: no estimate
_CHI2_MEDIAN = 0.454936  # the median of a chi-square of one degree
_CHI2_MEDIAN_SD = 2.33  # the sd of the median of n such draws over the median, times sqrt(n)


def scale_factor(spread: torch.Tensor, shape: float, own: torch.Tensor,
                 other: torch.Tensor) -> float:  # fmt: skip
    """How far ``other`` is this round against the remembered ``spread`` (per block, the
    largest difference): if the blocks' largest differences are now ``f * spread``, their
    squared norms are about ``(f * spread)**2 / shape`` (``shape``: the blocks' largest
    difference squared over their squared norm, seen in past decodes), and each block's
    squared sketch difference is that times a chi-square of one degree. ``f**2`` is the
    median over the blocks of ``x * shape / spread**2`` over the chi-square's median, robust to
    a block whose memory is far off either way, taken ``SCALE_SD`` of its sds high. Blocks
    with no finite positive spread or no sketch difference (outside the follower's range) do
    not count; 0.0 where fewer than ``SCALE_MIN_BLOCKS`` do."""
    x = (other.double() - own.double()).pow(2)
    s2 = spread.double().pow(2)
    ok = torch.isfinite(x) & (x > 0) & torch.isfinite(s2) & (s2 > 0)
    n = int(ok.sum())
    if n < SCALE_MIN_BLOCKS or not shape > 0:
        return 0.0
    f2 = float((x[ok] * shape / s2[ok]).median()) / _CHI2_MEDIAN
    f2 *= 1 + SCALE_SD * _CHI2_MEDIAN_SD / math.sqrt(n)
    return math.sqrt(f2) if math.isfinite(f2) and f2 > 0 else 0.0


def scaled_spread(spread: torch.Tensor, shape: float, own: torch.Tensor,
                  others: list[torch.Tensor]) -> torch.Tensor | None:  # fmt: skip
    """The remembered per-block spread (``loco.outer.spread.Spread.profile``: its profile
    over the blocks) rescaled to THIS round's distance to the farthest follower, from the
    followers' per-block sketches (``own`` the leader's): :func:`scale_factor`, at most
    ``SCALE_RANGE`` either way. None where no follower's factor can be estimated."""
    f = max((scale_factor(spread, shape, own, o) for o in others), default=0.0)
    if not f > 0:
        return None
    lo, hi = SCALE_RANGE
    return spread * min(max(f, lo), hi)
