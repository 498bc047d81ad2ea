"""The self-describing frame around a codec payload: a 40-byte header, then the payload.

Layout (little-endian; full description in docs/wire-format.md)::

    off size field
      0    4 magic            b"LOCO"
      4    1 version          1
      5    1 codec id         0 none, 1 bf16, 2 int8, 3 int4, 4 fp4, 5 topk, 6 sparse,
                              7 sign, 8 ternary
      6    1 dtype            dtype decode() returns: 0 float32, 1 float16, 2 bfloat16
      7    1 flags            bit 0: fp16 scales, bit 1: stochastic rounding; others 0
      8    8 numel            number of values (u64)
     16    4 block            elements per block (u32; 0 for none/bf16)
     20    4 k                top-k entries per block (u32; 0 unless topk); sparse:
                              k | bits << 24 (entries per chunk, value bits 1..4)
     24    8 payload_len      bytes after the header (u64)
     32    4 payload_crc      CRC-32C of the payload
     36    4 header_crc       CRC-32C of bytes 0..35
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

__all__ = [
    "PayloadError",
    "Header",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "DTYPES",
    "MAX_VALUES_PER_BYTE",
]

MAGIC = b"LOCO"
VERSION = 1
HEADER = struct.Struct("<4sBBBBQIIQII")
HEADER_SIZE = HEADER.size  # 40
FLAG_FP16_SCALE = 1
FLAG_STOCHASTIC = 2
_KNOWN_FLAGS = FLAG_FP16_SCALE | FLAG_STOCHASTIC
MAX_NUMEL = 1 << 48
# Most values a frame may hold per byte of frame (header included): the default bound of
# ``decode`` (numel <= MAX_VALUES_PER_BYTE * len(frame), i.e. at most 4 KiB of fp32 output per
# received byte). Every codec's layout stays below it (top-k and sparse check their block and k
# against it; the others hold at most 8 values per byte), so honest frames always pass.
MAX_VALUES_PER_BYTE = 1024

DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
DTYPE_IDS: dict[torch.dtype, int] = {v: k for k, v in DTYPES.items()}


class PayloadError(ValueError):
    """A received buffer is malformed: truncated, oversized, wrong version, bad checksum, bad
    field or non-finite content. The only exception ``decode`` raises for bad input."""


@dataclass(frozen=True)
class Header:
    """Decoded header fields (see the module docstring for the byte layout)."""

    codec_id: int
    dtype_id: int
    flags: int
    numel: int
    block: int
    k: int
    payload_len: int
    payload_crc: int

    def pack(self, crc_fn) -> bytes:  # noqa: ANN001 - crc_fn(bytes) -> int
        head = HEADER.pack(
            MAGIC,
            VERSION,
            self.codec_id,
            self.dtype_id,
            self.flags,
            self.numel,
            self.block,
            self.k,
            self.payload_len,
            self.payload_crc,
            0,
        )[:36]
        return head + struct.pack("<I", crc_fn(head))

    @staticmethod
    def unpack(buf: memoryview, crc_fn) -> Header:  # noqa: ANN001
        """Parse and check magic, version and header checksum; raise PayloadError otherwise."""
        if len(buf) < HEADER_SIZE:
            raise PayloadError(f"truncated: {len(buf)} bytes, a header needs {HEADER_SIZE}")
        (magic, version, codec_id, dtype_id, flags, numel, block, k, plen, pcrc, hcrc) = (
            HEADER.unpack_from(buf, 0)
        )
        if magic != MAGIC:
            raise PayloadError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise PayloadError(f"unsupported version {version}, this build reads {VERSION}")
        if crc_fn(bytes(buf[:36])) != hcrc:
            raise PayloadError("header checksum mismatch")
        if dtype_id not in DTYPES:
            raise PayloadError(f"unknown dtype id {dtype_id}")
        if flags & ~_KNOWN_FLAGS:
            raise PayloadError(f"unknown flag bits {flags:#x}")
        if numel >= MAX_NUMEL:
            raise PayloadError(f"numel {numel} too large")
        return Header(codec_id, dtype_id, flags, numel, block, k, plen, pcrc)
