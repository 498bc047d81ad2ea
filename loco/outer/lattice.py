"""phi in a few bits per value, using the receiver's own phi as side information.

Partners' slow weights are close (they differ by a few outer steps), so the sender quantizes
``phi`` on a per-block grid of step ``s`` and sends only each grid index modulo ``2**bits``
(modulo / lattice quantization, as in Davies et al., ICLR 2021). The receiver picks, for every
value, the grid point with that residue nearest to ITS OWN phi: exact up to ``s / 2`` whenever
the two phis differ by less than about ``(2**(bits-1) - 1) * s``. A 32-bit hash per block of
the full grid indices detects a wrong pick. A block where only a few values wrapped around the
window is repaired (:mod:`loco.outer.lattice_repair`: the one set of at most two values near
the window's edge whose move makes the check agree); any other failed block is never applied:
the decoder returns the receiver's own phi there (no pull on that block this round) and counts
it. The sender's own decoded value is the same grid point, computed with the same fp32
operations, so both members of a pair average identical numbers wherever both decodes succeed.

The step of a block is chosen by the sender (:func:`steps_for_spread`): the window covers
``margin`` times the largest partner difference it last observed on that block
(:class:`Spread`), or, before any observation, ``max|m| / window`` (``m``: its outer momentum, the
last phi movement) with 8 bits. The frame carries the steps (bf16), so the receiver need not
know the rule.

With ``rotate`` the grid is laid over every full block's rotated coordinates
(:mod:`loco.outer.block_rotation`): the window then covers a block's rotated difference, about
3x its rms, where unrotated it must cover its largest value. The hash and the spread are taken
on the rotated grid; the decoded values are rotated back.

Frame (little-endian): ``b"LLAT"``, version u8 (4; 3 had arithmetic check constants), bits
u8, flags u8 (bit 0: rotated; the others zero), 1 pad byte, numel u64, block u32, nblocks u32,
steps bf16[nblocks], hashes u32[nblocks], codes (``bits`` per value, packed MSB first, unused
low bits of the last byte zero), CRC-32 of everything before it (u32).
``bits == 0`` is a frame without values ("no phi this round": ``nblocks == 0``, the receiver keeps
its own phi). Otherwise ``2 <= bits <= 8``, ``1 <= block <= MAX_BLOCK`` and
``nblocks = ceil(numel / block)``, so the decoder's padded working size is below
``numel + MAX_BLOCK``; a rotated frame's block is a power of two.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from loco.compress import PayloadError
from loco.outer import bitpack, block_rotation, lattice_repair

MAGIC, VERSION = b"LLAT", 4
_HEAD = struct.Struct("<4sBBBxQII")
ROTATED = 1  # flags bit: the grid is over the blocks' rotated coordinates
MAX_BLOCK = 1 << 16  # largest block a frame may use
WINDOW_STEPS = 8.0  # before any observation: s = max|m| / 8, the window 127 s ~ 16 max|m|
CAP = 127.0 / WINDOW_STEPS  # the widest window, in largest momentum values: the 8-bit rule's
REL_FLOOR = 2.0**-12  # s >= max|phi| / 4096 (round 1: m = 0)
MAX_INDEX = 2**30  # |phi / s| above this is not a grid a sender makes: the block fails
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _pad(x: torch.Tensor, block: int) -> torch.Tensor:
    nb = _blocks(x.numel(), block)
    out = torch.zeros(nb * block, dtype=torch.float32)
    out[: x.numel()] = x
    return out.view(nb, block)


def _bf16(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to bf16 (what the frame carries), as fp32."""
    return s.to(torch.bfloat16).to(torch.float32)


def _floor(phi: torch.Tensor, block: int) -> torch.Tensor:
    return _pad(phi.float(), block).abs().amax(1) * REL_FLOOR


def steps_for(phi: torch.Tensor, momentum: torch.Tensor, block: int = 256,
              window: float = WINDOW_STEPS, bits: int = 8) -> torch.Tensor:  # fmt: skip
    """The grid step of every block before any observation (fp32, > 0): ``max|m| / window``,
    at least the floor ``max|phi| / 4096``, for 8-bit frames; at fewer ``bits`` the same
    window (+-127 of those steps) cut into ``2**(bits-1) - 1`` steps either side."""
    m = _pad(momentum.float(), block).abs().amax(1)
    s = torch.maximum(m / window, _floor(phi, block)) * (127 / (2 ** (bits - 1) - 1))
    return _bf16(torch.clamp(s, min=1e-30))


def momentum_window(momentum: torch.Tensor, block: int) -> torch.Tensor:
    """The 8-bit momentum rule's window per block: ``CAP`` times the block's largest
    outer-momentum value (0 where the momentum is zero)."""
    return CAP * _pad(momentum.float(), block).abs().amax(1)


def window_cap(phi: torch.Tensor, momentum: torch.Tensor, block: int) -> torch.Tensor:
    """The widest window a sender sizes from what partners showed it, per block: the 8-bit
    momentum rule's (:func:`momentum_window`); where the momentum is zero (no outer step yet,
    a block that never moves, padding) the 8-bit window of the floor step, ``127 * max|phi| /
    4096``. A partner that shows a huge distance (a hostile one) widens this site's next
    frames, and so its coding error, no further than that."""
    cap = momentum_window(momentum, block)
    return torch.where(cap > 0, cap, 127.0 * _floor(phi, block))


def steps_for_spread(phi: torch.Tensor, spread: torch.Tensor, bits: int, block: int,
                     margin: float, cap: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The grid step of every block whose window (``2**(bits-1) - 1`` steps either side) covers
    ``margin * spread`` (the largest partner difference observed on the block), at most
    ``cap`` (per block, :func:`window_cap`), at least the floor ``max|phi| / 4096``."""
    half = float(2 ** (bits - 1) - 1) if bits > 1 else 0.5
    window = margin * spread.float()
    if cap is not None:
        window = torch.minimum(window, cap)
    s = torch.maximum(window / half, _floor(phi, block))
    return _bf16(torch.clamp(s, min=1e-30, max=_BF16_MAX))  # finite, whatever the spread


def _index(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Grid indices round(x / s) (int64, ``s`` broadcast against ``x``); |index| capped at
    MAX_INDEX. The one place an index is made, so :func:`grid_points` is :func:`encode`'s."""
    return torch.clamp(torch.round(x / s), -MAX_INDEX, MAX_INDEX).to(torch.int64)


def _grid(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Full grid indices of padded ``x`` [nblocks, block] with one step per block."""
    return _index(x, s[:, None])


def grid_points(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The grid points an unrotated frame with these per-value ``steps`` gives the values ``x``:
    the same fp32 operations as :func:`encode`, so a receiver that has a sender's exact values
    (and its frame's steps) computes the sender's own decoded values bit for bit."""
    return _index(x.float(), steps).to(torch.float32) * steps


def _full_rows(n: int, block: int, rotated: bool) -> int:
    """How many blocks are rotated: every full block of a rotated frame, else none."""
    return n // block if rotated else 0


def _values(idx: torch.Tensor, s: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """The grid points of ``idx`` in phi's coordinates (the first ``rows`` blocks rotated
    back), the first ``n`` values."""
    vals = block_rotation.unrotate(idx.to(torch.float32) * s[:, None], rows)
    return vals.reshape(-1)[:n].clone()


def frame_bytes(numel: int, block: int = 256, bits: int = 8) -> int:
    """The size of a frame of ``numel`` values in blocks of ``block`` at ``bits`` per value."""
    if bits == 0:
        return _HEAD.size + 4
    return _HEAD.size + _blocks(numel, block) * (2 + 4) + (numel * bits + 7) // 8 + 4


def _frame(n: int, bits: int, block: int, nb: int, parts: tuple[bytes, ...],
           flags: int = 0) -> bytes:  # fmt: skip
    body = _HEAD.pack(MAGIC, VERSION, bits, flags, n, block, nb) + b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def skip_frame(numel: int) -> bytes:
    """A frame without values: the receiver keeps its own phi on these ``numel`` values."""
    return _frame(numel, 0, 1, 0, ())


def encode(phi: torch.Tensor, momentum: torch.Tensor, block: int = 256,
           window: float = WINDOW_STEPS, *, bits: int = 8, steps: torch.Tensor | None = None,
           rotate: bool = False) -> tuple[bytes, torch.Tensor]:  # fmt: skip
    """``(frame, own decoded phi)``. ``steps``: the grid step per block (from
    :func:`steps_for_spread`); None: :func:`steps_for` (``momentum``, ``window``, ``bits``:
    the 8-bit momentum rule's window at ``bits``). ``rotate``:
    the grid is over every full block's rotated coordinates (``block`` a power of two).
    ValueError if ``phi`` holds NaN/Inf or an argument is out of range."""
    if not window > 0:
        raise ValueError(f"window={window} must be > 0")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block={block}; use 1 <= block <= {MAX_BLOCK}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}; use 2 <= bits <= 8")
    if rotate and not block_rotation.is_power_of_two(block):
        raise ValueError(f"block={block}; a rotated frame's block is a power of two")
    x = phi.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("phi holds NaN/Inf; refusing to encode it")
    n = x.numel()
    if steps is None:
        s = steps_for(x, momentum.detach().reshape(-1).cpu(), block, window, bits)
    else:
        s = _bf16(steps.float())
        if s.numel() != _blocks(n, block) or not bool((s > 0).all() & torch.isfinite(s).all()):
            raise ValueError("steps: one finite positive step per block")
    rows = _full_rows(n, block, rotate)
    idx = _grid(block_rotation.rotate(_pad(x, block), rows), s)
    codes = idx.reshape(-1)[:n] % (1 << bits)
    parts = (s.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes(),
             lattice_repair.check(idx).numpy().astype("<u4").tobytes(), bitpack.pack(codes, bits))  # fmt: skip
    frame = _frame(n, bits, block, s.numel(), parts, ROTATED if rotate else 0)
    return frame, _values(idx, s, n, rows)


@dataclass(frozen=True)
class _Head:
    numel: int
    bits: int
    block: int
    nblocks: int
    size: int
    rotated: bool


def _header(mv: memoryview, max_numel: int | None) -> _Head:
    """The frame's header, every field checked against the others and the frame's length (the
    CRC is not checked). Allocates nothing."""
    if len(mv) < _HEAD.size + 4:
        raise PayloadError(f"lattice frame of {len(mv)} bytes is too short")
    magic, ver, bits, flags, n, block, nb = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise PayloadError("not a lattice phi frame (magic)")
    if ver != VERSION:
        raise PayloadError(f"lattice frame version {ver}, this build reads {VERSION}")
    if bits != 0 and not 2 <= bits <= 8:
        raise PayloadError(f"lattice frame with {bits} bits per value")
    if not 1 <= block <= MAX_BLOCK or nb != (0 if bits == 0 else _blocks(n, block)):
        raise PayloadError(f"bad lattice header: numel {n}, block {block}, blocks {nb}")
    if flags & ~ROTATED or (flags and not block_rotation.is_power_of_two(block)):
        raise PayloadError(f"lattice frame flags {flags:#x} with block {block}")
    if max_numel is not None and n > max_numel:
        raise PayloadError(f"lattice frame holds {n} values, more than max_numel {max_numel}")
    size = frame_bytes(n, block, bits)
    if len(mv) != size:
        raise PayloadError(f"lattice frame of {len(mv)} bytes, header implies {size}")
    return _Head(n, bits, block, nb, size, bool(flags & ROTATED))


def _view(buf: object) -> memoryview:
    try:
        return memoryview(buf).cast("B")  # type: ignore[arg-type]
    except TypeError as e:
        raise PayloadError(f"not a bytes-like buffer: {type(buf).__name__}") from e


def frame_rotated(buf: bytes | bytearray | memoryview) -> bool:
    """Whether a frame's grid is over rotated blocks (its flags byte; False for a buffer too
    short to hold a header, which :func:`decode` refuses)."""
    mv = _view(buf)
    return len(mv) >= _HEAD.size and bool(mv[6] & ROTATED)


def frame_numel(buf: bytes | bytearray | memoryview) -> int:
    """The number of values a frame holds, from a header checked for magic, version, bits,
    block range, block count and the frame's exact length (so the result is at most
    ``len(buf)``; the CRC is left to :func:`decode`). PayloadError if it is not such a frame."""
    return _header(_view(buf), None).numel


@dataclass
class Decoded:
    """A decoded frame: the values (the receiver's own phi on failed blocks), the blocks that
    failed their hash, and per block the largest ``|decoded - reference|`` on the frame's grid
    (a rotated frame's: in rotated coordinates, as its sender sizes windows; NaN where failed;
    empty for a frame without values)."""

    values: torch.Tensor
    failed: int
    blocks: int
    spread: torch.Tensor
    block: int = 0
    steps: torch.Tensor | None = None  # per block, the frame's grid step (None: not known)
    repaired: int = 0  # blocks whose check failed and a few wrapped values were moved back
    bits: int = 0  # the frame's bits per value (0: a frame without values)
    sq: torch.Tensor | None = None  # per block, ``sum (decoded - reference)**2`` (NaN: failed)


def window_slack(got: Decoded) -> tuple[float, float, int]:
    """How much wider than needed the sender's windows were: ``(sum, sum of squares, count)``
    of ``log2(half-window / largest distance)`` over the blocks that decoded farther than the
    grid's rounding (``spread > step / 2``); the half-window is ``2**(bits-1)`` steps. The mean
    is the bits per value a window sized to each block's actual distance would have saved; a
    small spread about it says one factor for the whole frame would have saved as much."""
    if not got.bits or got.steps is None:
        return 0.0, 0.0, 0
    far = torch.isfinite(got.spread) & (got.spread > got.steps / 2)
    if not bool(far.any()):
        return 0.0, 0.0, 0
    half = got.steps[far] * float(1 << (got.bits - 1))
    slack = torch.log2(half / got.spread[far]).double()
    return float(slack.sum()), float(slack.pow(2).sum()), int(far.sum())


def decode(buf: bytes | bytearray | memoryview, ref: torch.Tensor,
           max_numel: int | None = None) -> Decoded:  # fmt: skip
    """The sender's phi, reconstructed next to the receiver's own ``ref`` (same length).

    The header (bits, ``1 <= block <= MAX_BLOCK``, block count, numel <= ``max_numel`` and
    == ``ref.numel()``, exact frame length), the CRC, the steps (finite, > 0) and the codes'
    padding bits are checked before anything sized by the header is allocated; the working set
    is then O(numel + MAX_BLOCK). A block whose hash disagrees (the two phis are too far apart
    for its grid) takes ``ref``'s values and is counted in ``failed``.

    Raises:
        PayloadError: malformed frame, wrong length, bad CRC, steps or padding.
    """
    mv = _view(buf)
    h = _header(mv, max_numel)
    n, nb, block = h.numel, h.nblocks, h.block
    if ref.numel() != n:
        raise PayloadError(f"lattice frame holds {n} values, the reference {ref.numel()}")
    (crc,) = struct.unpack_from("<I", mv, h.size - 4)
    if zlib.crc32(mv[: h.size - 4]) != crc:
        raise PayloadError("lattice frame checksum mismatch")
    own = ref.detach().reshape(-1).float().cpu()
    if h.bits == 0:
        return Decoded(own.clone(), 0, 0, torch.zeros(0))
    o = _HEAD.size
    raw = torch.from_numpy(np.frombuffer(mv, "<i2", nb, o).astype(np.int16))
    s = raw.view(torch.bfloat16).to(torch.float32)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise PayloadError("lattice steps must be finite and > 0")
    hashes = torch.from_numpy(np.frombuffer(mv, "<u4", nb, o + 2 * nb).astype(np.int64))
    c = torch.zeros(nb * block, dtype=torch.int64)  # the sender's padded values are 0 -> index 0
    c[:n] = bitpack.unpack(mv, o + 6 * nb, n, h.bits)
    c = c.view(nb, block)
    p = _pad(own, block)
    rows = _full_rows(n, block, h.rotated)
    pr = block_rotation.rotate(p, rows)  # the reference in the grid's coordinates
    far = (pr.abs() / s[:, None] >= MAX_INDEX).any(1)  # no sender makes such a grid
    r = torch.round(pr / s[:, None]).clamp(-MAX_INDEX, MAX_INDEX).to(torch.int64)
    if n < nb * block:
        r.view(-1)[n:] = 0
    mod = 1 << h.bits
    idx = c + mod * torch.round((r - c).to(torch.float64) / mod).to(torch.int64)
    tried = (lattice_repair.check(idx) != hashes) & ~far
    repaired = lattice_repair.repair(idx, pr, s, tried, hashes, h.bits, n)
    bad = tried | far
    grid = idx.to(torch.float32) * s[:, None]
    diff = grid - pr  # in the grid's coordinates, as the sender sizes it
    spread = diff.abs().amax(1)
    spread[bad] = float("nan")
    sq = diff.double().pow(2).sum(1).float()  # the rotation keeps a block's norm
    sq[bad] = float("nan")
    vals = block_rotation.unrotate(grid, rows)
    vals = torch.where(bad[:, None], p, vals)
    if not bool(torch.isfinite(vals).all()):
        raise PayloadError("lattice values are not finite")
    return Decoded(vals.reshape(-1)[:n].clone(), int(bad.sum()), nb, spread, block, s, repaired,
                   h.bits, sq)  # fmt: skip


@dataclass
class Segment:
    """A frame decoded as one segment of a partner's pull: the decode, per value 1.0 where its
    block failed, and the blocks over the receiver's own values (how many, how many failed).
    ``own``: the segment is the receiver's own shard (its spread may size the next frame)."""

    decoded: Decoded
    bad: torch.Tensor
    blocks: int
    failed: int
    own: bool


def decode_segment(buf: memoryview, numel: int, seg_lo: int, ref: torch.Tensor, *,
                   shard: tuple[int, int], owned: tuple[int, int],
                   max_numel: int) -> Segment:  # fmt: skip
    """A partner's frame of ``[seg_lo, seg_lo + numel)`` next to the receiver's ``ref`` (its
    padded ``shard``; it owns ``owned``). A partner with another rank count sends segments that
    are not the receiver's shard: the reference is then ``ref`` where they overlap and 0
    elsewhere, so only blocks inside the receiver's range can decode (one across its edge fails:
    no pull there), and only blocks over its owned values count. PayloadError as
    :func:`decode`, or if the frame's length is not the segment's."""
    if frame_numel(buf) != numel:
        raise PayloadError(f"lattice frame of {frame_numel(buf)} values for a segment of {numel}")
    slo, shi = shard
    lo, hi = owned
    own = seg_lo == slo and numel == ref.numel()
    if own:
        seg_ref, a, b = ref, 0, numel
    else:
        if numel > max_numel:
            raise PayloadError(f"lattice segment of {numel} values, more than {max_numel}")
        seg_ref = torch.zeros(numel, dtype=torch.float32)
        x, y = max(seg_lo, slo), min(seg_lo + numel, shi)
        if x < y:
            seg_ref[x - seg_lo : y - seg_lo] = ref[x - slo : y - slo]
        a = max(seg_lo, lo) - seg_lo
        b = max(min(seg_lo + numel, hi) - seg_lo, 0)
    got = decode(buf, seg_ref, max_numel=numel)
    block = max(got.block, 1)
    bad_block = torch.isnan(got.spread) if got.blocks else torch.zeros(0, dtype=torch.bool)
    bad = bad_block.float().repeat_interleave(block)[:numel] if got.blocks else torch.zeros(numel)
    mine = bad_block[a // block : -(-b // block)] if b > a else bad_block[:0]
    return Segment(got, bad, int(mine.numel()), int(mine.sum()), own)
