"""Pure-torch (and NumPy, for the checksum) reference of the ``csrc/`` kernels.

Same signatures and the same bits as ``torch.ops.loco.quantize`` / ``dequantize`` / ``crc32c``
(see docs/wire-format.md). Used when the compiled kernels are unavailable and by the tests, which
compare the two bitwise. Works on any device torch supports.
"""

from __future__ import annotations

import numpy as np
import torch

from loco.compress import sign_ref, ternary_ref

__all__ = ["quantize", "dequantize", "crc32c", "payload_nbytes", "hash_uniform"]

# Codec ids and status codes: keep in sync with csrc/compress.h.
NONE, BF16, INT8, INT4, FP4, TOPK, SPARSE, SIGN, TERNARY = range(9)
OK, NON_FINITE, OVERFLOW, BAD_SCALE, BAD_INDEX, BAD_PADDING, BAD_VALUE, BAD_TRIT = range(8)
# sparse: the header's (and the ops') k field carries k | bits << SPARSE_BITS_SHIFT.
SPARSE_BITS_SHIFT = 24
SPARSE_K_MASK = (1 << SPARSE_BITS_SHIFT) - 1

_M32 = 0xFFFFFFFF
_FP4_MAG = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_STEP = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 0.0)


def _qmax(codec: int) -> float:
    return 7.0 if codec == INT4 else (6.0 if codec == FP4 else 127.0)


def _cmax(codec: int) -> float:
    """Largest code magnitude a payload can hold; a valid scale keeps cmax * scale finite."""
    return 8.0 if codec == INT4 else (6.0 if codec == FP4 else 128.0)


def payload_nbytes(n: int, codec: int, block: int, k: int, fp16_scale: bool) -> int:
    """Payload size in bytes (header excluded) of ``n`` values; mirrors ``make_layout``."""
    if codec == NONE:
        return 4 * n
    if codec == BF16:
        return 2 * n
    if codec == SIGN:
        return sign_ref.payload_nbytes(n, block, fp16_scale)
    if codec == TERNARY:
        return ternary_ref.payload_nbytes(n, block, fp16_scale)
    nb = -(-n // block)
    scales = nb * (2 if fp16_scale else 4)
    if codec == INT8:
        return scales + n
    if codec in (INT4, FP4):
        return scales + (n + 1) // 2
    if codec == TOPK:
        if nb == 0:
            return scales
        ktot = (nb - 1) * k + min(k, n - (nb - 1) * block)
        return scales + ktot * (1 if block <= 256 else 2) + ktot
    if codec == SPARSE:
        if nb == 0:
            return 0
        kk, bits = sparse_fields(k)
        ib, ss = sparse_index_bits(block), 2 if fp16_scale else 4
        last = min(kk, n - (nb - 1) * block)
        return (nb - 1) * sparse_record(kk, ib, bits, ss) + sparse_record(last, ib, bits, ss)
    raise ValueError(f"unknown codec id {codec}")


def sparse_fields(k_field: int) -> tuple[int, int]:
    """(k, bits) of a sparse k field (``k | bits << 24``)."""
    return k_field & SPARSE_K_MASK, k_field >> SPARSE_BITS_SHIFT


def sparse_index_bits(block: int) -> int:
    """Bits of one chunk-relative index: ceil(log2(block)), at least 1 (4096: 12)."""
    return max(1, (block - 1).bit_length())


def sparse_record(kb: int, ib: int, bits: int, ss: int) -> int:
    """Bytes of one chunk's record: low and high scale, kb indices, kb codes (byte-padded)."""
    return 2 * ss + (kb * ib + 7) // 8 + (kb * bits + 7) // 8


# ----------------------------------------------------------------------------- random bits


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic on values < 2^32 with multipliers < 2^31: exact, no overflow.
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def hash_uniform(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """u = hash(seed, i) >> 8 scaled to [0, 1): the stochastic-rounding bits of element ``i``."""
    return (_hash(seed, idx) >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _hash(seed: int, idx: torch.Tensor) -> torch.Tensor:
    lo = idx & _M32
    hi = idx >> 32
    inner = _mix32((seed + hi * 0x61C88647) & _M32)
    return _mix32(lo ^ inner)


# ----------------------------------------------------------------------------- quantize


def _scales(amax: torch.Tensor, qmax: float, fp16: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-block scales (fp32 values used for coding), their wire bytes, and an overflow flag."""
    s = amax / qmax
    tiny = torch.tensor(torch.finfo(torch.float32).smallest_normal, device=s.device)
    s = torch.where((amax > 0) & (s < tiny), tiny, s)  # >= FLT_MIN: 1 / s stays finite
    if not fp16:
        return s, s.view(torch.uint8), False
    h = s.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32) + (h.to(torch.float32) < s).to(torch.int32)
    h = bits.to(torch.int16).view(torch.float16)
    overflow = bool(((bits & 0x7C00) == 0x7C00).any())
    return h.to(torch.float32), h.view(torch.uint8), overflow


def _round(y: torch.Tensor, qmax: float, seed: int, idx: torch.Tensor) -> torch.Tensor:
    y = torch.clamp(y, -qmax, qmax)
    if seed < 0:
        return torch.round(y)
    return torch.clamp(torch.floor(y + hash_uniform(seed, idx)), -qmax, qmax)


def _fp4_codes(y: torch.Tensor, neg: torch.Tensor, seed: int, idx: torch.Tensor) -> torch.Tensor:
    a = y.abs()
    if seed < 0:
        m = (
            (a > 0.25).int()
            + (a >= 0.75).int()
            + (a > 1.25).int()
            + (a >= 1.75).int()
            + (a > 2.5).int()
            + (a >= 3.5).int()
            + (a > 5.0).int()
        )
    else:
        j = sum((a >= t).int() for t in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
        lo = torch.tensor(_FP4_MAG, device=a.device)[j]
        step = torch.tensor(_FP4_STEP, device=a.device)[j]
        u = hash_uniform(seed, idx)
        m = torch.clamp(j + (u * step < a - lo).int(), max=7)
    return m | (neg.int() << 3)


def _fp4_table(device: torch.device) -> torch.Tensor:
    mags = torch.tensor(_FP4_MAG, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def _pack(q: torch.Tensor) -> torch.Tensor:
    q = (q.to(torch.int32) & 0xF).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    q = q.view(-1, 2)
    return (q[:, 0] << 4) | q[:, 1]


def _blocks(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = v.numel()
    full = n // block * block
    head = v[:full].view(-1, block)
    tail = v[full:].view(1, -1) if full < n else None
    return head, tail


def quantize(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    payload: torch.Tensor,
    codec: int,
    block: int,
    k: int,
    fp16_scale: bool,
    seed: int,
) -> int:
    """Reference of ``torch.ops.loco.quantize``: fill ``payload``, update ``residual``.

    Returns a status code (0 ok, 1 non-finite input, 2 overflow). On a non-zero status the
    payload and residual contents are unspecified.
    """
    n = x.numel()
    assert payload.numel() == payload_nbytes(n, codec, block, k, fp16_scale)
    if n == 0:
        return OK
    v = x + residual if residual is not None else x
    if not bool(torch.isfinite(v).all()):
        return NON_FINITE
    idx = torch.arange(n, device=v.device, dtype=torch.int64) if seed >= 0 else None

    if codec == NONE:
        payload.copy_(v.view(torch.uint8))
        if residual is not None:
            residual.copy_(v - v)
        return OK
    if codec == BF16:
        return _bf16(v, residual, payload, seed, idx)

    if codec == SPARSE:
        return sparse_quantize(v, residual, payload, block, k, fp16_scale, seed)
    if codec == SIGN:
        return sign_ref.quantize(v, residual, payload, block, fp16_scale)
    if codec == TERNARY:
        return ternary_ref.quantize(v, residual, payload, block, fp16_scale)
    return _scaled(v, residual, payload, codec, block, k, fp16_scale, seed, idx)


def _bf16(v: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, seed: int,
          idx: torch.Tensor | None) -> int:  # fmt: skip
    """bf16 values (stochastic rounding with ``seed >= 0``)."""
    if seed < 0:
        h = v.to(torch.bfloat16)
    else:
        bits = v.view(torch.int32).to(torch.int64) & _M32
        hb = ((bits + (_hash(seed, idx) & 0xFFFF)) >> 16) & 0xFFFF
        h = hb.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    if not bool(torch.isfinite(h).all()):
        return OVERFLOW
    payload.copy_(h.view(torch.uint8))
    if residual is not None:
        residual.copy_(v - h.to(torch.float32))
    return OK


def _scaled(v: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, codec: int,
            block: int, k: int, fp16_scale: bool, seed: int, idx: torch.Tensor | None) -> int:  # fmt: skip
    """The codecs of one scale per block (int8, int4, fp4, top-k): the scales, then codes."""
    n = v.numel()
    qmax = _qmax(codec)
    nb = -(-n // block)
    amax = torch.empty(nb, dtype=torch.float32, device=v.device)
    head, tail = _blocks(v.abs(), block)
    if head.numel():
        amax[: head.shape[0]] = head.amax(dim=1)
    if tail is not None:
        amax[-1] = tail.amax()
    s, sbytes, overflow = _scales(amax, qmax, fp16_scale)
    if overflow or not bool(torch.isfinite(s * _cmax(codec)).all()):
        return OVERFLOW
    ss = 2 if fp16_scale else 4
    payload[: nb * ss].copy_(sbytes)
    codes = payload[nb * ss :]
    # Per-element scale (expanded view) and a safe divisor for all-zero blocks.
    s_el = s.repeat_interleave(block)[:n]
    inv = torch.div(torch.ones_like(s), torch.where(s > 0, s, torch.ones_like(s)))  # 1 / s
    y = torch.where(s_el > 0, v * inv.repeat_interleave(block)[:n], torch.zeros_like(v))

    if codec in (INT8, INT4):
        q = _round(y, qmax, seed, idx).to(torch.int8)
        deq = q.to(torch.float32) * s_el
        codes.copy_(q.view(torch.uint8) if codec == INT8 else _pack(q))
    elif codec == FP4:
        c = _fp4_codes(y, v < 0, seed, idx)
        deq = _fp4_table(v.device)[c.long()] * s_el
        codes.copy_(_pack(c))
    elif codec == TOPK:
        return _topk(v, residual, codes, s, block, k, seed, n)
    else:
        raise ValueError(f"unknown codec id {codec}")
    if residual is not None:
        residual.copy_(v - deq)
    return OK


def _topk(
    v: torch.Tensor,
    residual: torch.Tensor | None,
    codes: torch.Tensor,
    s: torch.Tensor,
    block: int,
    k: int,
    seed: int,
    n: int,
) -> int:
    # key = |v| bits << 32 | (2^32 - 1 - j): larger magnitude first, then lower index.
    absbits = (v.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    nb = s.numel()
    isz = 1 if block <= 256 else 2
    full = n // block
    sel_idx, sel_blk = [], []
    parts = [(0, full, block)] if full else []
    if full < nb:
        parts.append((full, nb, n - full * block))
    for b0, b1, length in parts:
        kb = min(k, length)
        j = torch.arange(length, device=v.device, dtype=torch.int64)
        keys = (
            absbits[b0 * block : b0 * block + (b1 - b0) * length].view(b1 - b0, length) << 32
        ) | (_M32 - j)
        top = torch.topk(keys, kb, dim=1, sorted=False).indices
        sel_idx.append(torch.sort(top, dim=1).values)
        sel_blk.append(torch.arange(b0, b1, device=v.device).unsqueeze(1).expand(-1, kb))
    idx = torch.cat([t.reshape(-1) for t in sel_idx])
    blk = torch.cat([t.reshape(-1) for t in sel_blk])
    g = blk * block + idx  # global positions, block-major, ascending within a block
    sv = s[blk]
    vals = v[g]
    inv = torch.div(torch.ones_like(sv), torch.where(sv > 0, sv, torch.ones_like(sv)))
    y = torch.where(sv > 0, vals * inv, torch.zeros_like(vals))
    q = _round(y, 127.0, seed, g).to(torch.int8)
    ktot = idx.numel()
    if isz == 1:
        codes[:ktot].copy_(idx.to(torch.uint8))
    else:
        codes[: 2 * ktot].copy_(idx.to(torch.int32).to(torch.int16).view(torch.uint8))
    codes[ktot * isz :].copy_(q.view(torch.uint8))
    if residual is not None:
        residual.copy_(v)
        residual[g] = vals - q.to(torch.float32) * sv
    return OK


# ----------------------------------------------------------------------------- dequantize


def _scale_values(payload: torch.Tensor, nb: int, fp16: bool) -> torch.Tensor | None:
    if fp16:
        raw = payload[: 2 * nb].view(torch.int16).to(torch.int32) & 0xFFFF
        bad = ((raw & 0x8000) != 0) | ((raw & 0x7C00) == 0x7C00)
        vals = payload[: 2 * nb].view(torch.float16).to(torch.float32)
    else:
        raw = payload[: 4 * nb].view(torch.int32).to(torch.int64) & _M32
        bad = ((raw & 0x80000000) != 0) | ((raw & 0x7F800000) == 0x7F800000)
        vals = payload[: 4 * nb].view(torch.float32)
    return None if bool(bad.any()) else vals


def _unpack(p: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    hi = p >> 4
    lo = p & 0xF
    c = torch.stack([hi, lo], dim=1).reshape(-1)[:n].to(torch.int32)
    if signed:
        c = torch.where(c >= 8, c - 16, c)
    return c


def dequantize(
    payload: torch.Tensor,
    out: torch.Tensor,
    codec: int,
    block: int,
    k: int,
    fp16_scale: bool,
    accumulate: bool,
) -> int:
    """Reference of ``torch.ops.loco.dequantize``: validate, then ``out (+)= decode(payload)``.

    Returns a status code; ``out`` is untouched unless the status is 0.
    """
    n = out.numel()
    assert payload.numel() == payload_nbytes(n, codec, block, k, fp16_scale)
    if codec == NONE:
        d = payload.view(torch.float32)
        if not bool(torch.isfinite(d).all()):
            return BAD_VALUE
    elif codec == BF16:
        d = payload.view(torch.bfloat16)
        if not bool(torch.isfinite(d).all()):
            return BAD_VALUE
        d = d.to(torch.float32)
    elif codec == SPARSE:
        return sparse_dequantize(payload, out, block, k, fp16_scale, accumulate)
    elif codec in (SIGN, TERNARY):
        mod = sign_ref if codec == SIGN else ternary_ref
        d = mod.decode(payload, n, block, fp16_scale)
        if isinstance(d, int):
            return d
    else:
        nb = -(-n // block)
        ss = 2 if fp16_scale else 4
        s = _scale_values(payload, nb, fp16_scale)
        if s is None or not bool(torch.isfinite(s * _cmax(codec)).all()):
            return BAD_SCALE
        body = payload[nb * ss :]
        if codec in (INT4, FP4) and n % 2 and int(payload[-1]) & 0xF:
            return BAD_PADDING
        if codec == TOPK:
            return _topk_decode(body, out, s, block, k, n, accumulate)
        s_el = s.repeat_interleave(block)[:n]
        if codec == INT8:
            d = body.view(torch.int8).to(torch.float32) * s_el
        elif codec == INT4:
            d = _unpack(body, n, signed=True).to(torch.float32) * s_el
        elif codec == FP4:
            d = _fp4_table(out.device)[_unpack(body, n, signed=False).long()] * s_el
        else:
            raise ValueError(f"unknown codec id {codec}")
    if n == 0:
        return OK
    if accumulate:
        out.add_(d)
    else:
        out.copy_(d)
    return OK


def _topk_decode(
    body: torch.Tensor,
    out: torch.Tensor,
    s: torch.Tensor,
    block: int,
    k: int,
    n: int,
    accumulate: bool,
) -> int:
    nb = s.numel()
    isz = 1 if block <= 256 else 2
    full = n // block
    lens = torch.full((nb,), block, dtype=torch.int64, device=out.device)
    if full < nb:
        lens[-1] = n - full * block
    kbs = torch.clamp(lens, max=k)
    ktot = int(kbs.sum()) if nb else 0
    if isz == 1:
        idx = body[:ktot].to(torch.int64)
    else:
        idx = body[: 2 * ktot].view(torch.int16).to(torch.int64) & 0xFFFF
    vals = body[ktot * isz :].view(torch.int8)
    blk = torch.repeat_interleave(torch.arange(nb, device=out.device), kbs)
    # Strictly increasing inside each block, and below the block's length.
    first = torch.ones_like(idx, dtype=torch.bool)
    starts = torch.cumsum(kbs, 0) - kbs
    if ktot:
        first[:] = False
        first[starts[kbs > 0]] = True
        prev = torch.cat([idx.new_full((1,), -1), idx[:-1]])
        ok_order = first | (idx > prev)
        if not bool((ok_order & (idx < lens[blk])).all()):
            return BAD_INDEX
    if n == 0:
        return OK
    g = blk * block + idx
    d = vals.to(torch.float32) * s[blk]
    if accumulate:
        out[g] += d
    else:
        out.zero_()
        out[g] = d
    return OK


# ----------------------------------------------------------------------------- sparse


def _half_round(s: torch.Tensor, up: bool) -> torch.Tensor:
    """fp16 value next to finite ``s >= 0``: the smallest >= s (``up``; Inf above 65504) or the
    largest <= s (at most 65504), as the fp16 bit pattern (int32)."""
    h = s.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    if up:
        return bits + (h.to(torch.float32) < s).to(torch.int32)
    return bits - (h.to(torch.float32) > s).to(torch.int32)


def _pack_bits(vals: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of ``width``-bit fields -> rows of bytes, LSB first; the last byte's unused high bits
    are zero."""
    rows, cnt = vals.shape
    nbytes = (cnt * width + 7) // 8
    shifts = torch.arange(width, device=vals.device, dtype=torch.int32)
    bits = ((vals.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, cnt * width)
    bits = torch.cat([bits, bits.new_zeros(rows, nbytes * 8 - cnt * width)], dim=1)
    weights = torch.arange(8, device=vals.device, dtype=torch.int32)
    return (bits.view(rows, nbytes, 8) << weights).sum(-1).to(torch.uint8)


def _unpack_bits(region: torch.Tensor, cnt: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack_bits`: (fields as int64 rows, True per row whose padding is 0)."""
    rows = region.shape[0]
    shifts = torch.arange(8, device=region.device, dtype=torch.int32)
    bits = ((region.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)
    pad_ok = ~bits[:, cnt * width :].any(dim=1)
    weights = torch.arange(width, device=region.device, dtype=torch.int32)
    fields = (bits[:, : cnt * width].view(rows, cnt, width) << weights).sum(-1)
    return fields.to(torch.int64), pad_ok


def _sparse_parts(n: int, block: int, k: int) -> list[tuple[int, int, int, int]]:
    """(first chunk, end chunk, chunk length, entries per chunk) of the full chunks and of the
    short last one."""
    full, nb = n // block, -(-n // block)
    parts = [(0, full, block, min(k, block))] if full else []
    if full < nb:
        parts.append((full, nb, n - full * block, min(k, n - full * block)))
    return parts


def _sparse_step(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Magnitude step of each chunk: (hi - lo) / (L - 0.5), fp32 (unused with one level)."""
    return (hi - lo) / torch.full_like(hi, levels - 0.5)


def sparse_quantize(
    v: torch.Tensor,
    residual: torch.Tensor | None,
    payload: torch.Tensor,
    block: int,
    k_field: int,
    fp16: bool,
    seed: int,
) -> int:
    """Sparse codec of finite ``v`` (docs/wire-format.md): per chunk the top-k by magnitude,
    sign + (bits-1)-bit magnitude on the grid lo + m * (hi - lo) / (L - 0.5) (1 bit: the
    midpoint of lo and hi)."""
    k, bits = sparse_fields(k_field)
    ib, ss, levels = sparse_index_bits(block), 2 if fp16 else 4, 1 << (bits - 1)
    n = v.numel()
    absbits = (v.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    if residual is not None:
        residual.copy_(v)
    off = 0
    for c0, c1, length, kb in _sparse_parts(n, block, k):
        rows, rec = c1 - c0, sparse_record(kb, ib, bits, ss)
        span = slice(c0 * block, c0 * block + rows * length)
        mags = absbits[span].view(rows, length)
        j = torch.arange(length, device=v.device, dtype=torch.int64)
        # key = |v| bits << 32 | (2^32 - 1 - j): larger magnitude first, then lower index
        top = torch.topk((mags << 32) | (_M32 - j), kb, dim=1, sorted=False).indices
        idx = torch.sort(top, dim=1).values
        lo = mags.gather(1, idx).amin(1).to(torch.int32).view(torch.float32)
        hi = mags.amax(1).to(torch.int32).view(torch.float32)
        if fp16:
            hb, lb = _half_round(hi, up=True), _half_round(lo, up=False)
            if bool(((hb & 0x7C00) == 0x7C00).any()):
                return OVERFLOW
            hi16 = hb.to(torch.int16).view(torch.float16)
            lo16 = lb.to(torch.int16).view(torch.float16)
            hi, lo = hi16.to(torch.float32), lo16.to(torch.float32)
            scales = torch.stack([lo16, hi16], 1).view(torch.uint8).view(rows, 2 * ss)
        else:
            scales = torch.stack([lo, hi], 1).view(torch.uint8).view(rows, 2 * ss)
        g = idx + (torch.arange(c0, c1, device=v.device) * block).unsqueeze(1)
        vals = v[g]
        m, dec = _sparse_codes(vals, lo, hi, levels, seed, g)
        codes = ((vals < 0).to(torch.int64) << (bits - 1)) | m
        recs = torch.cat([scales, _pack_bits(idx, ib), _pack_bits(codes, bits)], dim=1)
        payload[off : off + rows * rec].copy_(recs.reshape(-1))
        off += rows * rec
        if residual is not None:
            residual[g] = vals - dec
    return OK


def _sparse_codes(
    vals: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int, seed: int,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Magnitude indices m (int64) and decoded values of the selected ``vals`` (rows x kb)."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    w = _sparse_step(lo, hi, levels)
    a = vals.abs()
    y = torch.where(w > 0, (a - lo) / torch.where(w > 0, w, torch.ones_like(w)), 0.0)
    y = torch.clamp(y, 0.0, levels - 1.0)
    if seed < 0:
        m = torch.round(y)
    else:
        m = torch.clamp(torch.floor(y + hash_uniform(seed, g)), max=levels - 1.0)
    mag = _sparse_level(lo, hi, w, m, levels)
    return m.to(torch.int64), torch.where(vals < 0, -mag, mag)


def _sparse_level(
    lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor, m: torch.Tensor, levels: int
) -> torch.Tensor:
    """Decoded magnitude of index m: lo + m * w; with one level (1 bit) the midpoint
    lo + (hi - lo) * 0.5, so that the largest value of a chunk always shrinks (error feedback
    stays bounded even when lo is 0)."""
    if levels == 1:
        return (lo + (hi - lo) * 0.5).expand_as(m)
    return lo + m * w


def sparse_dequantize(
    payload: torch.Tensor, out: torch.Tensor, block: int, k_field: int, fp16: bool,
    accumulate: bool,
) -> int:  # fmt: skip
    """Validate every record of a sparse payload (scales, padding bits, index order), then
    ``out (+)= decode``. Status precedence: BAD_SCALE, BAD_PADDING, BAD_INDEX."""
    k, bits = sparse_fields(k_field)
    ib, ss, levels = sparse_index_bits(block), 2 if fp16 else 4, 1 << (bits - 1)
    n = out.numel()
    decoded, status, off = [], set(), 0
    for c0, c1, length, kb in _sparse_parts(n, block, k):
        rows, rec = c1 - c0, sparse_record(kb, ib, bits, ss)
        recs = payload[off : off + rows * rec].view(rows, rec)
        off += rows * rec
        s = _scale_values(recs[:, : 2 * ss].clone().reshape(-1), 2 * rows, fp16)
        if s is None or not bool((s[0::2] <= s[1::2]).all()):
            status.add(BAD_SCALE)
            continue
        ibytes = (kb * ib + 7) // 8
        idx, pad_i = _unpack_bits(recs[:, 2 * ss : 2 * ss + ibytes], kb, ib)
        codes, pad_c = _unpack_bits(recs[:, 2 * ss + ibytes :], kb, bits)
        if not bool((pad_i & pad_c).all()):
            status.add(BAD_PADDING)
        if not bool((idx[:, 1:] > idx[:, :-1]).all() and (idx < length).all()):
            status.add(BAD_INDEX)
        lo, hi = s[0::2].unsqueeze(1), s[1::2].unsqueeze(1)
        m = (codes & (levels - 1)).to(torch.float32)
        mag = _sparse_level(lo, hi, _sparse_step(lo, hi, levels), m, levels)
        d = torch.where((codes >> (bits - 1)) == 1, -mag, mag)
        decoded.append((idx + (torch.arange(c0, c1, device=out.device) * block).unsqueeze(1), d))
    for st in (BAD_SCALE, BAD_PADDING, BAD_INDEX):
        if st in status:
            return st
    if not accumulate:
        out.zero_()
    for g, d in decoded:
        g, d = g.reshape(-1), d.reshape(-1)
        out[g] = out[g] + d if accumulate else d  # -0.0 stays -0.0 without accumulate
    return OK


# ----------------------------------------------------------------------------- crc32c

_POLY = 0x82F63B78


def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _table()


def _zero_op(nbytes: int) -> np.ndarray:
    """Columns of the GF(2) operator that feeds ``nbytes`` zero bytes to a raw register."""
    one = np.array([_raw_seq(1 << i, b"\0") for i in range(32)], dtype=np.uint32)
    result = np.array([1 << i for i in range(32)], dtype=np.uint32)
    while nbytes:
        if nbytes & 1:
            result = _apply(one, result)
        one = _apply(one, one)
        nbytes >>= 1
    return result


def _apply(op: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for i in range(32):
        out ^= np.where((v >> np.uint32(i)) & np.uint32(1), op[i], np.uint32(0))
    return out


def _raw_seq(reg: int, data: bytes) -> int:
    for b in data:
        reg = int(_TABLE[(reg ^ b) & 0xFF]) ^ (reg >> 8)
    return reg


def crc32c(data: bytes | bytearray | memoryview | np.ndarray | torch.Tensor, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) with zlib-style chaining; ``crc32c(b"123456789") == 0xE3069283``.

    NumPy implementation: the data is cut into equal lanes processed side by side, then the lane
    registers are folded with GF(2) zero-shift operators.
    """
    if isinstance(data, torch.Tensor):
        buf = data.detach().cpu().contiguous().view(torch.uint8).numpy()
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    reg0 = (~crc) & _M32
    if n < 4096:
        return (~_raw_seq(reg0, buf.tobytes())) & _M32
    lanes = 1 << max(0, (n // 2048 - 1).bit_length())
    lane_len = -(-n // lanes)
    pad = lanes * lane_len - n
    # Leading zero bytes leave a zero raw register unchanged, so pad in front.
    grid = np.concatenate([np.zeros(pad, np.uint8), buf]).reshape(lanes, lane_len).T.copy()
    state = np.zeros(lanes, dtype=np.uint32)
    for t in range(lane_len):
        state = _TABLE[(state ^ grid[t]) & np.uint32(0xFF)] ^ (state >> np.uint32(8))
    span = lane_len
    while state.size > 1:
        op = _zero_op(span)
        state = _apply(op, state[0::2]) ^ state[1::2]
        span *= 2
    reg = int(_apply(_zero_op(n), np.array([reg0], np.uint32))[0]) ^ int(state[0])
    return (~reg) & _M32
