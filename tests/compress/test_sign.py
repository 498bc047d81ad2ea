"""The sign codec (one bit per value, one mean-magnitude scale per block): layout, the scale
against the block's mean with a derived bound, order independence, error feedback, hostile
payloads and configuration."""

from __future__ import annotations

import struct

import pytest
import torch

import loco.compress as lc
from loco.compress import ErrorFeedback, PayloadError, decode, encode
from loco.compress.wire import HEADER_SIZE

from .test_wire import _resign


def test_layout_is_scales_then_one_bit_per_value(backend):
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, -0.0, 5.0, -6.0, 7.0, -8.0])
    buf = encode(x, "sign", block=4)
    body = buf[HEADER_SIZE:]
    assert len(body) == 3 * 4 + 2  # three fp32 scales, ten bits in two bytes
    scales = struct.unpack("<3f", body[:12])
    assert scales == (2.5, 2.75, 7.5)  # mean magnitudes of [1,2,3,4], [0,0,5,6], [7,8]
    # set bits: negative values (1, 3, 7, 9); -0.0 is not negative
    assert body[12] == 0b10001010 and body[13] == 0b00000010
    torch.testing.assert_close(
        decode(buf), torch.tensor([2.5, -2.5, 2.5, -2.5, 2.75, 2.75, 2.75, -2.75, 7.5, -7.5])
    )
    assert lc.make_codec("sign").bytes_per_param() == 0.140625  # 36 bytes per 256 values


@pytest.mark.parametrize("block", [1, 7, 256, 4096])
def test_scale_is_the_block_mean_magnitude(block, backend):
    """Truncating |v| / amax to 24 fractional bits loses < amax * 2^-24 per value, so the scale
    is within amax * 2^-24 of the mean (plus the final fp32 rounding, 2^-24 relative)."""
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3 * block + block // 2 + 1, generator=g) * torch.rand(1, generator=g) * 100
    y = decode(encode(x, "sign", block=block))
    for b0 in range(0, x.numel(), block):
        v = x[b0 : b0 + block].double()
        mean, amax = float(v.abs().mean()), float(v.abs().max())
        s = y[b0 : b0 + block].double().abs()
        assert bool((s == s[0]).all())
        assert abs(float(s[0]) - mean) <= amax * 2**-24 + mean * 2**-24
        assert torch.equal(torch.signbit(y[b0 : b0 + block]), x[b0 : b0 + block] < 0)


def test_scale_does_not_depend_on_the_order_of_the_values(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) * torch.logspace(-6, 3, 4096)  # a wide range of sizes
    perm = torch.randperm(4096, generator=g)
    a = decode(encode(x, "sign", block=4096)).abs()[0]
    b = decode(encode(x[perm], "sign", block=4096)).abs()[0]
    assert a.item() == b.item()


def test_error_feedback_residual_is_exactly_what_was_not_sent(backend):
    ef = ErrorFeedback("sign", 1000, block=64)
    g = torch.Generator().manual_seed(1)
    r0 = torch.zeros(1000)
    for _ in range(3):
        x = torch.randn(1000, generator=g)
        y = decode(ef.encode(x))
        assert torch.equal(ef.residual, (x + r0) - y)
        r0 = ef.residual.clone()


@pytest.mark.parametrize(
    "scale,why",
    [(-1.0, "scale"), (-0.0, "scale"), (float("inf"), "scale"), (float("nan"), "scale")],
)
def test_bad_scale_is_a_payload_error(scale, why, backend):
    buf = bytearray(encode(torch.randn(20), "sign", block=8))
    struct.pack_into("<f", buf, HEADER_SIZE + 4, scale)
    with pytest.raises(PayloadError, match=why):
        decode(_resign(buf))


def test_padding_bits_are_a_payload_error(backend):
    buf = bytearray(encode(torch.randn(20), "sign", block=8))
    assert decode(bytes(buf)).numel() == 20
    buf[-1] |= 0x80  # bit 23 of 20 values
    with pytest.raises(PayloadError, match="padding"):
        decode(_resign(buf))


def test_fp16_scale_overflow_and_stochastic_rounding_are_refused(backend):
    with pytest.raises(ValueError, match="does not fit"):
        encode(torch.full((16,), 1e6), "sign", block=8, scale_dtype="fp16")
    with pytest.raises(ValueError, match="nearest"):
        lc.make_codec("sign", rounding="stochastic")
