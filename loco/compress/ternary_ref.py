"""Pure-torch reference of the ``ternary`` codec: values in {-s, 0, +s}, one scale per block.

Layout of a payload of ``n`` values in blocks of ``block``: ``nb = ceil(n / block)`` scales
(fp32, or fp16 with ``fp16_scale``), then ``ceil(n / 5)`` bytes of trits, five per byte: byte
``j`` is ``t[5j] + 3 t[5j+1] + 9 t[5j+2] + 27 t[5j+3] + 81 t[5j+4]`` (at most 242); trits past
``n`` are zero. Trit 0 decodes to 0, 1 to ``+s_b``, 2 to ``-s_b``.

Per block of ``n_b`` values ``v`` (already ``x + residual``, finite), in the fixed point of
:mod:`loco.compress.sign_ref` so that every implementation gets the same bits in any order:
``u_i = floor(|v_i| / amax * 2^24)``, ``S = sum(u_i)`` (int64, exact). Value ``i`` is kept when
``10 * u_i * n_b > 7 * S`` (its magnitude is above 0.7 times the block's mean); ``K`` values are
kept (at least one when ``amax > 0``), their ``u`` summing to ``S_k``. The scale is the mean
magnitude of the kept values, which minimizes the squared error of this code:
``s = fp32(double(S_k) * 2^-24 * double(amax) / K)`` (IEEE double, one rounding per step), 0 for
an all-zero block; fp16 scales round that to nearest-even.
"""

from __future__ import annotations

import torch

from loco.compress import sign_ref

OK, OVERFLOW, BAD_SCALE, BAD_PADDING, BAD_TRIT = 0, 2, 3, 5, 7  # reference.py's status codes
TRITS_PER_BYTE = 5
MAX_BYTE = 3**TRITS_PER_BYTE - 1  # 242: five trits of 2
_POW3 = (1, 3, 9, 27, 81)


def payload_nbytes(n: int, block: int, fp16_scale: bool) -> int:
    """Payload size in bytes of ``n`` values."""
    nb = -(-n // block)
    return nb * (2 if fp16_scale else 4) + -(-n // TRITS_PER_BYTE)


def block_code(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(trits, scales)`` of non-empty ``v``: the trits as int64 (nb x block, zero in the last
    block's padding) and the fp32 scale of every block, as the module docstring defines them."""
    uf, amax, count = sign_ref.fixed_magnitudes(v, block)
    u = uf.to(torch.int64)  # exact integers <= 2^24
    total = u.sum(dim=1, keepdim=True)
    kept = 10 * u * count.to(torch.int64)[:, None] > 7 * total  # padding: u = 0, never kept
    k = kept.sum(dim=1)
    sk = torch.where(kept, u, torch.zeros_like(u)).sum(dim=1)
    safe_k = torch.clamp(k, min=1).double()  # k >= 1 whenever amax > 0
    s = (sk.double() * 2.0**-sign_ref.FIXED_BITS * amax.double() / safe_k).float()
    s = torch.where(amax > 0, s, torch.zeros_like(s))
    neg = sign_ref._padded_blocks(v, block) < 0
    one, two = torch.ones_like(u), torch.full_like(u, 2)
    trits = torch.where(kept, torch.where(neg, two, one), torch.zeros_like(u))
    return trits, s


def _pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Flat trits -> bytes, five per byte (the first in the lowest base-3 digit)."""
    n = t.numel()
    buf = torch.zeros(-(-n // TRITS_PER_BYTE) * TRITS_PER_BYTE, dtype=torch.int32, device=t.device)
    buf[:n] = t.to(torch.int32)
    w = torch.tensor(_POW3, dtype=torch.int32, device=t.device)
    return (buf.view(-1, TRITS_PER_BYTE) * w).sum(dim=1).to(torch.uint8)


def _unpack_trits(body: torch.Tensor, n: int) -> torch.Tensor:
    w = torch.tensor(_POW3, dtype=torch.int32, device=body.device)
    return ((body.to(torch.int32)[:, None] // w) % 3).reshape(-1)[:n]


def _values(t: torch.Tensor, s_el: torch.Tensor) -> torch.Tensor:
    """Decoded values of trits ``t`` with per-element scales: 0 (+0.0), +s or -s."""
    return torch.where(t == 1, s_el, torch.where(t == 2, -s_el, torch.zeros_like(s_el)))


def quantize(v: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, block: int,
             fp16_scale: bool) -> int:  # fmt: skip
    """Fill ``payload`` with the code of ``v`` (already ``x + residual``, finite, non-empty) and
    set ``residual = v - decode(payload)``; return a status code (OVERFLOW: an fp16 scale)."""
    n = v.numel()
    nb = -(-n // block)
    trits, s = block_code(v, block)
    s = sign_ref.write_scales(s, payload, fp16_scale)
    if s is None:
        return OVERFLOW
    ss = 2 if fp16_scale else 4
    t = trits.reshape(-1)[:n]
    payload[nb * ss :].copy_(_pack_trits(t))
    if residual is not None:
        residual.copy_(v - _values(t, s.repeat_interleave(block)[:n]))
    return OK


def decode(payload: torch.Tensor, n: int, block: int, fp16_scale: bool) -> torch.Tensor | int:
    """The decoded values of a payload of ``n`` values, or a status code when it is bad, in
    this order: a negative (-0.0 included), NaN or Inf scale (BAD_SCALE), a byte above 242
    (BAD_TRIT), a non-zero trit past ``n`` (BAD_PADDING)."""
    nb = -(-n // block)
    s = sign_ref.read_scales(payload, nb, fp16_scale)
    if s is None:
        return BAD_SCALE
    body = payload[nb * (2 if fp16_scale else 4) :]
    if body.numel() and int(body.max()) > MAX_BYTE:
        return BAD_TRIT
    if n % TRITS_PER_BYTE and int(body[-1]) >= 3 ** (n % TRITS_PER_BYTE):
        return BAD_PADDING
    return _values(_unpack_trits(body, n), s.repeat_interleave(block)[:n])
