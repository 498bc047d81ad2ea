"""Codes of 1-8 bits per value packed into bytes, most significant bit first (the lattice
phi frames and the landing's offset frames)."""

from __future__ import annotations

import numpy as np
import torch

from loco.compress import PayloadError


def pack(codes: torch.Tensor, bits: int) -> bytes:
    """``codes`` (< ``2**bits``) as one big-endian bit string: every 8 codes are ``bits`` bytes,
    one ``8 * bits``-bit integer (the last group zero-padded, its unused bytes cut)."""
    c = codes.numpy().astype(np.uint64)
    n = c.size
    if bits == 8:
        return c.astype(np.uint8).tobytes()
    groups = np.zeros(-(-n // 8) * 8, np.uint64)
    groups[:n] = c
    g = groups.reshape(-1, 8)
    shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(bits)
    word = np.bitwise_or.reduce(g << shifts, axis=1)
    byte_shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64) * np.uint64(8)
    out = ((word[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)
    return out[: (n * bits + 7) // 8].tobytes()


def unpack(mv: memoryview, offset: int, n: int, bits: int) -> torch.Tensor:
    """``n`` codes of ``bits`` bits (int64); PayloadError if the last byte's unused bits are set."""
    nbytes = (n * bits + 7) // 8
    raw = np.frombuffer(mv, np.uint8, nbytes, offset)
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    tail = (8 - (n * bits) % 8) % 8
    if tail and raw[-1] & ((1 << tail) - 1):
        raise PayloadError("codes: the unused bits of the last byte are not zero")
    ngroups = -(-n // 8)
    b = np.zeros(ngroups * bits, np.uint64)
    b[:nbytes] = raw
    byte_shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64) * np.uint64(8)
    word = np.bitwise_or.reduce(b.reshape(-1, bits) << byte_shifts, axis=1)
    shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(bits)
    codes = (word[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(codes.reshape(-1)[:n].astype(np.int64))
