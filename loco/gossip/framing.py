"""Framing of payload streams: header messages and hand-framed raw data chunks.

A data chunk on the wire is the protobuf encoding of ``Chunk{data=..., crc32=...}`` built by
hand (tag, varint length, bytes, tag, fixed32), so the payload is copied once (into the
message) and never through a protobuf object. Any protobuf decoder reads it as a ``Chunk``.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

from ._pb import gossip_pb2 as pb

PROTOCOL_VERSION = 1
MAX_CHUNK_BYTES = 4 << 20  # hard cap on the data of one message
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)  # gRPC message limit, both directions

ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
}

_DATA_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)
_CRC_TAG = b"\x1d"  # field 3, wire type 5 (fixed32)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_header(header: pb.SegmentHeader) -> bytes:
    """Wire bytes of ``Chunk{header}``."""
    return pb.Chunk(header=header).SerializeToString()


def encode_data(data: memoryview, crc: int | None = None) -> bytes:
    """Wire bytes of ``Chunk{data, crc32}``; ``crc`` defaults to ``zlib.crc32(data)``."""
    if crc is None:
        crc = zlib.crc32(data)
    return b"".join((_DATA_TAG, _varint(len(data)), data, _CRC_TAG, crc.to_bytes(4, "little")))


def decode_chunk(buf: bytes) -> tuple[pb.SegmentHeader | None, memoryview | None, int]:
    """Split one wire message into ``(header, data, crc)``; exactly one of header/data is set.

    Raises ``ValueError`` for a message that is neither a header nor a data chunk.
    """
    mv = memoryview(buf)
    if len(buf) >= 2 and buf[0] == 0x12:
        n, shift, i = 0, 0, 1
        while i < len(buf):
            b = buf[i]
            n |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                break
            shift += 7
        end = i + n
        if end == len(buf):
            return None, mv[i:end], 0
        if end + 5 == len(buf) and buf[end] == 0x1D:
            return None, mv[i:end], int.from_bytes(buf[end + 1 : end + 5], "little")
    msg = pb.Chunk.FromString(buf)  # general (slow) path: any valid encoding
    if msg.HasField("header"):
        return msg.header, None, 0
    if msg.data:
        return None, memoryview(msg.data), msg.crc32
    raise ValueError("chunk carries neither header nor data")


def _gf2_times(mat: tuple[int, ...] | list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a, b) -> tuple[int, ...]:
    return tuple(_gf2_times(a, col) for col in b)


@lru_cache(maxsize=64)
def _shift_operator(nbytes: int) -> tuple[int, ...]:
    """GF(2) operator appending ``nbytes`` zero bytes to a CRC-32 register (as in zlib)."""
    op: tuple[int, ...] = (0xEDB88320,) + tuple(1 << i for i in range(31))  # one zero bit
    for _ in range(3):  # -> one zero byte
        op = _gf2_compose(op, op)
    result = tuple(1 << i for i in range(32))
    while nbytes:
        if nbytes & 1:
            result = _gf2_compose(op, result)
        nbytes >>= 1
        if nbytes:
            op = _gf2_compose(op, op)
    return result


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (no data pass)."""
    if len2 == 0:
        return crc1
    return _gf2_times(_shift_operator(len2), crc1) ^ crc2


def grid_crcs(data: memoryview, block: int) -> list[int]:
    """CRC-32 of each ``block``-byte piece of ``data`` (the last one may be shorter)."""
    return [zlib.crc32(data[i : i + block]) for i in range(0, len(data), block)]


def identity(b: bytes) -> bytes:
    """(De)serializer that passes wire bytes through untouched."""
    return b
