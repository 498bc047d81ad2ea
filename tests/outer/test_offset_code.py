"""The landing's offset code (``loco.outer.offset_code``): Lloyd-Max levels per block, its
error on Gaussian values, its exact frame size, and a decoder that refuses every malformed
frame with PayloadError before allocating anything the header sizes."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from loco.compress import PayloadError
from loco.outer import offset_code

# squared error of the Lloyd-Max quantizer of a unit Gaussian (Max 1960): 1, 2, 3, 4 bits
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def _x(n=200_000, seed=0, scale=0.01):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_offsets_lose_the_lloyd_max_error(bits):
    x = _x()
    buf, own = offset_code.encode(x, bits)
    assert len(buf) == offset_code.frame_bytes(x.numel(), bits)
    assert len(buf) <= x.numel() * bits / 8 + 2 * x.numel() / 256 + 40
    assert torch.equal(offset_code.decode(buf, x.numel()), own)  # the sender's own values
    rel = float((own - x).pow(2).mean() / x.pow(2).mean())
    # the per-block scale is fit to the block (bf16: 2^-9 relative), so within a few percent
    assert rel == pytest.approx(LLOYD_MAX_MSE[bits], rel=0.05)


def test_uneven_blocks_keep_their_own_scale_and_zeros_stay_zero():
    x = torch.cat([_x(256) * 100, torch.zeros(256), _x(300, seed=1)])
    buf, own = offset_code.encode(x, 3)
    assert torch.equal(own[256:512], torch.zeros(256))
    for part in (slice(0, 256), slice(512, 768), slice(768, 812)):  # the last: 44 values
        rel = float((own[part] - x[part]).pow(2).mean() / x[part].pow(2).mean())
        assert rel < 0.08
    assert torch.equal(offset_code.decode(buf, x.numel()), own)


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        offset_code.encode(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="bits"):
        offset_code.encode(torch.ones(4), 5)
    with pytest.raises(ValueError, match="bf16"):
        offset_code.encode(torch.full((4,), 3e38), 2)


def _resealed(buf: bytearray) -> bytes:
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(bytes(buf[:-4])))
    return bytes(buf)


def test_malformed_frames_are_refused():
    x = _x(1001)
    buf, _ = offset_code.encode(x, 3)
    head = offset_code._HEAD.size
    bad = []
    b = bytearray(buf)
    b[0] ^= 1
    bad.append(_resealed(b))  # magic
    b = bytearray(buf)
    b[4] = 2
    bad.append(_resealed(b))  # version
    b = bytearray(buf)
    b[5] = 5
    bad.append(_resealed(b))  # bits
    b = bytearray(buf)
    struct.pack_into("<I", b, 16, 0)
    bad.append(_resealed(b))  # block 0
    b = bytearray(buf)
    struct.pack_into("<I", b, 20, 3)
    bad.append(_resealed(b))  # block count
    bad.append(bytes(buf[:-1]))  # length
    b = bytearray(buf)
    b[head + 10] ^= 0xFF
    bad.append(bytes(b))  # CRC
    for scale in (0x7FC0, 0x7F80, 0xBF80, 0x8000, 0x7F7F):  # NaN, inf, -1, -0.0, bf16 max
        b = bytearray(buf)
        struct.pack_into("<H", b, head, scale)
        bad.append(_resealed(b))
    b = bytearray(buf)
    b[-5] |= 1  # 1001 * 3 bits: the last byte has 5 unused bits
    bad.append(_resealed(b))
    bad.append(b"LOFS")
    for frame in bad:
        with pytest.raises(PayloadError):
            offset_code.decode(frame, 1001)
    with pytest.raises(PayloadError, match="more than"):
        offset_code.decode(buf, 1000)  # more values than the segment


def test_a_header_claiming_2_60_values_is_refused_before_allocating():
    b = bytearray(offset_code.encode(_x(10), 2)[0])
    struct.pack_into("<Q", b, 8, 1 << 60)
    with pytest.raises(PayloadError):
        offset_code.decode(_resealed(b), 1 << 20)
    with pytest.raises(PayloadError):
        offset_code.frame_numel(_resealed(b))


def test_random_mutations_raise_payload_error_or_decode_finite_values():
    buf, _ = offset_code.encode(_x(700), 2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        b = bytearray(buf)
        for i in torch.randint(0, len(b), (3,), generator=gen).tolist():
            b[i] = int(torch.randint(0, 256, (1,), generator=gen))
        frame = _resealed(b) if int(torch.randint(0, 2, (1,), generator=gen)) else bytes(b)
        try:
            out = offset_code.decode(frame, 700)
        except PayloadError:
            continue
        assert out.numel() == 700 and bool(torch.isfinite(out).all())
