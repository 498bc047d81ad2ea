"""phi in about one byte per value, using the receiver's own phi as side information.

Partners' slow weights are close (they differ by a few outer steps), so the sender quantizes
``phi`` on a fine per-block grid of step ``s`` and sends only each grid index modulo 256
(modulo / lattice quantization, as in Davies et al., ICLR 2021). The receiver picks, for every
value, the grid point with that residue nearest to ITS OWN phi: exact up to ``s / 2`` whenever
the two phis differ by less than ``127 s``. Two checksums per block of the full grid indices
(their sum and their index-weighted sum) detect a wrong pick; the decoder then raises
``PayloadError`` and the partner is dropped for the round (never a wrong value applied). The
sender's own decoded value is the same grid point, computed with the same fp32 operations, so
both members of a pair still average identical numbers.

The step is ``s = max(max|m| / 8, max|phi| / 4096)`` per block (``m``: the sender's outer
momentum, i.e. its last phi movement): the window is +-16 recent steps, the error 1/16 step.

Frame (little-endian): ``b"LLAT"``, version u8, 3 pad bytes, numel u64, block u32, nblocks u32,
steps f32[nblocks], sums i64[nblocks], weighted sums i64[nblocks], codes u8[numel], CRC-32 of
everything before it (u32). ``1 <= block <= MAX_BLOCK`` and ``nblocks = ceil(numel / block)``,
so the decoder's padded working size ``nblocks * block`` is below ``numel + MAX_BLOCK``.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from loco.compress import PayloadError

MAGIC, VERSION = b"LLAT", 1
_HEAD = struct.Struct("<4sB3xQII")
MAX_BLOCK = 1 << 16  # largest block a frame may use (the encoder's default is 256)
WINDOW_STEPS = 8.0  # s = max|m| / 8: the window is 127 s ~ 16 x the largest recent step
REL_FLOOR = 2.0**-12  # s >= max|phi| / 4096 (round 1: m = 0)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _pad(x: torch.Tensor, block: int) -> torch.Tensor:
    nb = _blocks(x.numel(), block)
    out = torch.zeros(nb * block, dtype=torch.float32)
    out[: x.numel()] = x
    return out.view(nb, block)


def steps_for(phi: torch.Tensor, momentum: torch.Tensor, block: int = 256,
              window: float = WINDOW_STEPS) -> torch.Tensor:  # fmt: skip
    """The grid step of every block (fp32, > 0): ``max|m| / window`` (at least the floor)."""
    p = _pad(phi.float(), block).abs().amax(1)
    m = _pad(momentum.float(), block).abs().amax(1)
    s = torch.maximum(m / window, p * REL_FLOOR)
    return torch.clamp(s, min=1e-30)


def _grid(x: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """Full grid indices round(x / s) (int64), [nblocks, block]."""
    return torch.round(_pad(x, block) / s[:, None]).to(torch.int64)


def _values(idx: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    return (idx.to(torch.float32) * s[:, None]).reshape(-1)[:n].clone()


def _checks(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.arange(1, idx.shape[1] + 1, dtype=torch.int64)
    return idx.sum(1), (idx * w).sum(1)


def encode(
    phi: torch.Tensor, momentum: torch.Tensor, block: int = 256, window: float = WINDOW_STEPS
) -> tuple[bytes, torch.Tensor]:
    """``(frame, own decoded phi)``. ValueError if ``phi`` holds NaN/Inf. ``window``: grid
    steps per largest momentum value of a block (larger: finer grid, narrower window; the
    frame carries the steps, so the receiver need not know it)."""
    if not window > 0:
        raise ValueError(f"window={window} must be > 0")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block={block}; use 1 <= block <= {MAX_BLOCK}")
    x = phi.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("phi holds NaN/Inf; refusing to encode it")
    n = x.numel()
    s = steps_for(x, momentum.detach().reshape(-1).cpu(), block, window)
    idx = _grid(x, s, block)
    sums, wsums = _checks(idx)
    codes = (idx.reshape(-1)[:n] % 256).to(torch.uint8)
    body = b"".join((
        _HEAD.pack(MAGIC, VERSION, n, block, s.numel()),
        s.numpy().astype("<f4").tobytes(), sums.numpy().astype("<i8").tobytes(),
        wsums.numpy().astype("<i8").tobytes(), codes.numpy().tobytes(),
    ))  # fmt: skip
    return body + struct.pack("<I", zlib.crc32(body)), _values(idx, s, n)


def frame_bytes(numel: int, block: int = 256) -> int:
    """The size of a frame of ``numel`` values in blocks of ``block``."""
    return _HEAD.size + _blocks(numel, block) * (4 + 8 + 8) + numel + 4


def _header(mv: memoryview, max_numel: int | None) -> tuple[int, int, int, int]:
    """``(numel, block, nblocks, frame size)`` of a frame, every field checked against the
    others and the frame's length (the CRC is not checked). Allocates nothing."""
    if len(mv) < _HEAD.size + 4:
        raise PayloadError(f"lattice frame of {len(mv)} bytes is too short")
    magic, ver, n, block, nb = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise PayloadError("not a lattice phi frame (magic)")
    if ver != VERSION:
        raise PayloadError(f"lattice frame version {ver}, this build reads {VERSION}")
    if not 1 <= block <= MAX_BLOCK or nb != _blocks(n, block):
        raise PayloadError(f"bad lattice header: numel {n}, block {block}, blocks {nb}")
    if max_numel is not None and n > max_numel:
        raise PayloadError(f"lattice frame holds {n} values, more than max_numel {max_numel}")
    size = frame_bytes(n, block)
    if len(mv) != size:
        raise PayloadError(f"lattice frame of {len(mv)} bytes, header implies {size}")
    return n, block, nb, size


def _view(buf: object) -> memoryview:
    try:
        return memoryview(buf).cast("B")  # type: ignore[arg-type]
    except TypeError as e:
        raise PayloadError(f"not a bytes-like buffer: {type(buf).__name__}") from e


def frame_numel(buf: bytes | bytearray | memoryview) -> int:
    """The number of values a frame holds, from a header checked for magic, version, block
    range, block count and the frame's exact length (so the result is at most ``len(buf)``;
    the CRC is left to :func:`decode`). PayloadError if it is not such a frame."""
    return _header(_view(buf), None)[0]


def decode(buf: bytes | bytearray | memoryview, ref: torch.Tensor,
           max_numel: int | None = None) -> torch.Tensor:  # fmt: skip
    """The sender's phi, reconstructed next to the receiver's own ``ref`` (same length).

    The header (``1 <= block <= MAX_BLOCK``, block count, numel <= ``max_numel`` and
    == ``ref.numel()``, exact frame length) and the CRC are checked before anything sized by the
    header is allocated; the working set is then O(numel + MAX_BLOCK).

    Raises:
        PayloadError: malformed frame, wrong length, or a block whose checksums disagree
            (the two phis are too far apart for the grid: the partner must be dropped).
    """
    mv = _view(buf)
    n, block, nb, size = _header(mv, max_numel)
    if ref.numel() != n:
        raise PayloadError(f"lattice frame holds {n} values, the reference {ref.numel()}")
    (crc,) = struct.unpack_from("<I", mv, size - 4)
    if zlib.crc32(mv[: size - 4]) != crc:
        raise PayloadError("lattice frame checksum mismatch")
    o = _HEAD.size
    s = torch.from_numpy(np.frombuffer(mv, "<f4", nb, o).astype(np.float32))
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise PayloadError("lattice steps must be finite and > 0")
    sums = torch.from_numpy(np.frombuffer(mv, "<i8", nb, o + 4 * nb).astype(np.int64))
    wsums = torch.from_numpy(np.frombuffer(mv, "<i8", nb, o + 12 * nb).astype(np.int64))
    r = _grid(ref.detach().reshape(-1).float().cpu(), s, block)  # reference grid indices
    c = torch.zeros(nb * block, dtype=torch.int64)  # the sender's padded values are 0 -> index 0
    c[:n] = torch.from_numpy(np.frombuffer(mv, np.uint8, n, o + 20 * nb).copy())
    c = c.view(nb, block)
    if n < nb * block:
        r.view(-1)[n:] = 0
    idx = c + 256 * torch.round((r - c).to(torch.float64) / 256).to(torch.int64)
    got_s, got_w = _checks(idx)
    bad = (got_s != sums) | (got_w != wsums)
    if bool(bad.any()):
        raise PayloadError(
            f"lattice: {int(bad.sum())} of {nb} blocks are outside the window around our phi"
        )
    out = _values(idx, s, n)
    if not bool(torch.isfinite(out).all()):
        raise PayloadError("lattice values are not finite")
    return out
