"""Pure-torch reference of the ``sign`` codec: one bit per value and one scale per block.

Layout of a payload of ``n`` values in blocks of ``block``: ``nb = ceil(n / block)`` scales
(fp32, or fp16 with ``fp16_scale``), then ``ceil(n / 8)`` bytes of sign bits, value ``i`` in bit
``i % 8`` (least significant first) of byte ``i // 8``; a set bit is a negative value. Value
``i`` of block ``b`` decodes to ``-s_b`` or ``+s_b``; bits past ``n`` are zero.

The scale is the block's mean magnitude, which minimizes the squared error of a sign code. It is
computed in fixed point so that every implementation gets the same bits whatever the order of
the sum: ``u_i = floor(|v_i| / amax * 2^24)`` (fp32 division, exact scaling), summed exactly in
int64, then ``s = fp32(double(sum) * 2^-24 * double(amax) / count)`` (IEEE double, one
rounding per step); fp16 scales round that to nearest-even.
"""

from __future__ import annotations

import numpy as np
import torch

OK, NON_FINITE, OVERFLOW, BAD_SCALE, BAD_PADDING = 0, 1, 2, 3, 5  # reference.py's status codes
FIXED_BITS = 24


def payload_nbytes(n: int, block: int, fp16_scale: bool) -> int:
    """Payload size in bytes of ``n`` values."""
    nb = -(-n // block)
    return nb * (2 if fp16_scale else 4) + (n + 7) // 8


def _padded_blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    nb = -(-v.numel() // block)
    if v.numel() == nb * block:
        return v.view(nb, block)
    pad = torch.zeros(nb * block, dtype=v.dtype, device=v.device)
    pad[: v.numel()] = v
    return pad.view(nb, block)


def fixed_magnitudes(
    v: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, amax, count)`` of the blocks of ``v``: ``u = floor(|v| / amax * 2^24)`` as exact
    fp32 integers in ``[0, 2^24]`` (nb x block, zero in the last block's padding and in all-zero
    blocks), ``amax`` the blocks' max ``|v|`` (fp32) and ``count`` their lengths (fp64)."""
    n = v.numel()
    a = _padded_blocks(v.abs(), block)
    amax = a.amax(dim=1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    u = torch.floor((a / safe[:, None]) * float(1 << FIXED_BITS))
    count = torch.full((amax.numel(),), float(block), dtype=torch.float64, device=v.device)
    count[-1] = n - (count.numel() - 1) * block
    return u, amax, count


def block_scales(v: torch.Tensor, block: int) -> torch.Tensor:
    """The fp32 scale of every block: its mean magnitude, in the fixed point the docstring
    of this module defines."""
    u, amax, count = fixed_magnitudes(v, block)
    # integers <= 2^24, exact in fp32; their sum (<= 2^40) exact in fp64 in any order
    total = torch.sum(u, dim=1, dtype=torch.float64)
    s = (total * (2.0**-FIXED_BITS) * amax.double() / count).float()
    return torch.where(amax > 0, s, torch.zeros_like(s))


def _pack_bits(neg: torch.Tensor) -> torch.Tensor:
    if neg.device.type == "cpu":
        return torch.from_numpy(np.packbits(neg.numpy(), bitorder="little"))
    n = neg.numel()
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.int32, device=neg.device)
    bits[:n] = neg.to(torch.int32)
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=neg.device)
    return (bits.view(-1, 8) * w).sum(dim=1).to(torch.uint8)


def _unpack_bits(body: torch.Tensor, n: int) -> torch.Tensor:
    if body.device.type == "cpu":
        bits = np.unpackbits(body.numpy(), count=n, bitorder="little")
        return torch.from_numpy(bits).bool()
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=body.device)
    return ((body.to(torch.int32)[:, None] & w) != 0).reshape(-1)[:n]


def quantize(v: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, block: int,
             fp16_scale: bool) -> int:  # fmt: skip
    """Fill ``payload`` with the code of ``v`` (already ``x + residual``, finite) and set
    ``residual = v - decode(payload)``; return a status code."""
    n = v.numel()
    nb = -(-n // block)
    s = write_scales(block_scales(v, block), payload, fp16_scale)
    if s is None:
        return OVERFLOW
    ss = 2 if fp16_scale else 4
    neg = v < 0
    payload[nb * ss :].copy_(_pack_bits(neg))
    if residual is not None:
        s_el = s.repeat_interleave(block)[:n]
        residual.copy_(v - torch.where(neg, -s_el, s_el))
    return OK


def write_scales(s: torch.Tensor, payload: torch.Tensor, fp16_scale: bool) -> torch.Tensor | None:
    """Write the fp32 scales ``s`` at the head of ``payload`` (rounded to fp16 with
    ``fp16_scale``); return the scales as decoded, or None when an fp16 scale overflows."""
    if fp16_scale:
        h = s.to(torch.float16)
        if not bool(torch.isfinite(h).all()):
            return None
        sbytes, s = h.view(torch.uint8), h.to(torch.float32)
    else:
        sbytes = s.view(torch.uint8)
    payload[: sbytes.numel()].copy_(sbytes)
    return s


def read_scales(payload: torch.Tensor, nb: int, fp16_scale: bool) -> torch.Tensor | None:
    """The ``nb`` leading scales of a payload as fp32, or None when one is negative (-0.0
    included), NaN or Inf."""
    raw = payload[: nb * (2 if fp16_scale else 4)]
    s = raw.view(torch.float16).to(torch.float32) if fp16_scale else raw.view(torch.float32)
    if not bool((torch.isfinite(s) & (s >= 0) & ~torch.signbit(s)).all()):
        return None
    return s


def decode(payload: torch.Tensor, n: int, block: int, fp16_scale: bool) -> torch.Tensor | int:
    """The decoded values of a payload of ``n`` values, or a status code when it is bad: a
    negative, NaN or Inf scale (BAD_SCALE) or a set bit past ``n`` (BAD_PADDING)."""
    nb = -(-n // block)
    s = read_scales(payload, nb, fp16_scale)
    if s is None:
        return BAD_SCALE
    body = payload[nb * (2 if fp16_scale else 4) :]
    if n % 8 and int(body[-1]) >> (n % 8):
        return BAD_PADDING
    neg = _unpack_bits(body, n)
    s_el = s.repeat_interleave(block)[:n]
    return torch.where(neg, -s_el, s_el)
