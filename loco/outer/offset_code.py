"""The landing's offsets in 1-4 bits per value: a scalar code made for Gaussian values.

A follower's offset (``loco.outer.landing``: its phi less the leader's decoded phi, over n) is
a difference of two partners' slow weights, close to Gaussian inside a block. For such values
the Lloyd-Max levels (the squared-error optimal scalar quantizer of a unit Gaussian) at ``b``
bits leave 0.3634 of the variance at 1 bit (the sign), 0.1175 at 2, 0.0345 at 3 and 0.0095 at
4; the ternary code (1.63 bits) leaves about 0.19, and it is the offsets' error that the
landing's feedback cannot fully take back (docs/outer.md, "The offsets' code").

Per block of 256 values: the levels are scaled by the block's RMS to pick each value's level;
the scale sent is then the one that minimizes the block's squared error for those levels
(``sum |v| L / sum L^2``), rounded to bf16. A value decodes to ``sign * L[k] * scale`` (fp32),
the same bits at every receiver and at the sender.

Frame (little-endian): ``b"LOFS"``, version u8 (1), bits u8, 2 pad bytes, numel u64, block u32,
nblocks u32, scales bf16[nblocks], codes (``bits`` per value, packed MSB first: the sign bit,
then the level; unused low bits of the last byte zero), CRC-32 of everything before (u32).
``1 <= bits <= 4``, ``1 <= block <= MAX_BLOCK``, ``nblocks = ceil(numel / block)``.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from loco.compress import PayloadError
from loco.outer import bitpack
from loco.outer.lattice import _pad

MAGIC, VERSION = b"LOFS", 1
_HEAD = struct.Struct("<4sBBxxQII")
BLOCK = 256
MAX_BLOCK = 1 << 16
NAMES = {"normal1": 1, "normal2": 2, "normal3": 3, "normal4": 4}  # outer.phi_landing_codec
# Lloyd-Max levels and thresholds of a unit Gaussian (magnitudes)
_LEVELS = {
    1: (0.7979,),  # sqrt(2 / pi): the sign times the mean magnitude
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326),
}
_BOUNDS = {
    b: tuple((lv[i] + lv[i + 1]) / 2 for i in range(len(lv) - 1)) for b, lv in _LEVELS.items()
}
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def frame_bytes(numel: int, bits: int, block: int = BLOCK) -> int:
    """The size of a frame of ``numel`` values."""
    nb = -(-numel // block)
    return _HEAD.size + 2 * nb + -(-numel * bits // 8) + 4


def encode(x: torch.Tensor, bits: int, block: int = BLOCK) -> tuple[bytes, torch.Tensor]:
    """``(frame, decoded values)`` of ``x``; ValueError on NaN/Inf, a bad ``bits`` or
    ``block``, or a block whose scale does not fit bf16."""
    if bits not in _LEVELS:
        raise ValueError(f"bits={bits}; use 1, 2, 3 or 4")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block={block}; use 1 <= block <= {MAX_BLOCK}")
    v = x.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("offsets hold NaN/Inf; refusing to encode them")
    n = v.numel()
    b = _pad(v, block)
    count = torch.full((b.shape[0],), float(block), dtype=torch.float64)
    if n % block:
        count[-1] = n % block
    rms = (b.pow(2).sum(1, dtype=torch.float64) / count).sqrt()
    mag = b.abs()
    ratio = mag / rms.float().clamp_min(1e-30)[:, None]
    k = torch.bucketize(ratio, torch.tensor(_BOUNDS[bits], dtype=torch.float32))
    lv = torch.tensor(_LEVELS[bits], dtype=torch.float32)[k]
    if n % block:  # the last block's padding is not fit
        lv[-1, n % block :] = 0.0
    scale = (mag * lv).sum(1, dtype=torch.float64) / lv.pow(2).sum(1, dtype=torch.float64)
    scale = torch.where(rms > 0, scale, torch.zeros_like(scale))
    s = scale.float().to(torch.bfloat16)
    if not bool((s.float() <= _BF16_MAX / 4).all()):  # inf and NaN fail it too
        raise ValueError("an offset block's scale does not fit bf16")
    codes = (torch.signbit(b).to(torch.int64) << (bits - 1)) | k
    codes = codes.reshape(-1)[:n]
    parts = (s.view(torch.int16).numpy().astype("<i2").tobytes(), bitpack.pack(codes, bits))
    head = _HEAD.pack(MAGIC, VERSION, bits, n, block, b.shape[0])
    body = head + b"".join(parts)
    frame = body + struct.pack("<I", zlib.crc32(body))
    return frame, _values(codes, s.float(), bits, block)


def _values(codes: torch.Tensor, s: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``sign * level * scale`` of every code (the sign bit set: negative), in fp32."""
    levels = _LEVELS[bits]
    table = torch.tensor(levels + tuple(-x for x in levels), dtype=torch.float32)
    n = codes.numel()
    out = torch.zeros(s.numel() * block, dtype=torch.float32)
    out[:n] = table[codes]
    out.view(-1, block).mul_(s[:, None])
    return out[:n]


def frame_numel(buf: bytes | bytearray | memoryview) -> int:
    """The number of values of a frame whose header and length are consistent (PayloadError
    otherwise; the CRC is left to :func:`decode`)."""
    return _header(memoryview(buf).cast("B"))[0]


def _header(mv: memoryview) -> tuple[int, int, int, int]:
    if len(mv) < _HEAD.size + 4:
        raise PayloadError(f"offset frame of {len(mv)} bytes is too short")
    magic, ver, bits, n, block, nb = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise PayloadError("not an offset frame (magic)")
    if ver != VERSION:
        raise PayloadError(f"offset frame version {ver}, this build reads {VERSION}")
    if bits not in _LEVELS:
        raise PayloadError(f"offset frame with {bits} bits per value")
    if not 1 <= block <= MAX_BLOCK or nb != -(-n // block):
        raise PayloadError(f"bad offset header: numel {n}, block {block}, blocks {nb}")
    if len(mv) != frame_bytes(n, bits, block):
        raise PayloadError(f"offset frame of {len(mv)} bytes, header implies "
                           f"{frame_bytes(n, bits, block)}")  # fmt: skip
    return n, bits, block, nb


def decode(buf: bytes | bytearray | memoryview, max_numel: int) -> torch.Tensor:
    """The values of a frame of at most ``max_numel`` values. The header, the frame's exact
    length, the CRC, the scales (finite, >= 0, at most a quarter of bf16's largest) and the
    padding bits are checked before anything sized by the header is allocated.

    Raises:
        PayloadError: any of those checks fails.
    """
    try:
        mv = memoryview(buf).cast("B")  # type: ignore[arg-type]
    except TypeError as e:
        raise PayloadError(f"not a bytes-like buffer: {type(buf).__name__}") from e
    if len(mv) >= _HEAD.size and _HEAD.unpack_from(mv)[3] > max_numel:
        raise PayloadError(f"offset frame holds more than {max_numel} values")
    n, bits, block, nb = _header(mv)
    (crc,) = struct.unpack_from("<I", mv, len(mv) - 4)
    if zlib.crc32(mv[:-4]) != crc:
        raise PayloadError("offset frame checksum mismatch")
    raw = torch.from_numpy(np.frombuffer(mv, "<i2", nb, _HEAD.size).astype(np.int16))
    s = raw.view(torch.bfloat16).float()
    if bool(torch.signbit(s).any()) or not bool((s <= _BF16_MAX / 4).all()):  # NaN fails too
        raise PayloadError("offset scales must be >= 0 (not -0.0), finite and at most a quarter "
                           "of bf16's largest")  # fmt: skip
    codes = bitpack.unpack(mv, _HEAD.size + 2 * nb, n, bits)
    return _values(codes, s, bits, block)
