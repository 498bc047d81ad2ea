"""The ternary codec (values -s, 0, +s; five trits per byte; one scale per block): the definition
on a hand-computed block, the compiled kernel against the reference bit for bit, the squared
error on Gaussian data, error feedback, hostile payloads and configuration."""

from __future__ import annotations

import random
import struct

import pytest
import torch

import loco.compress as lc
from loco.compress import ErrorFeedback, PayloadError, decode, decode_accumulate, encode
from loco.compress import reference as ref
from loco.compress.wire import HEADER, HEADER_SIZE

from .helpers import ext_or_skip
from .test_wire import _mutate, _resign

BLOCKS = (1, 5, 7, 64, 256, 512, 4096)
SIZES = (1, 2, 3, 4, 5, 6, 9, 11, 511, 512, 513, 2559, 2560, 4099, 10_007)


def _args(block: int, fp16: bool) -> tuple:
    return (ref.TERNARY, block, 0, fp16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _data(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(n, generator=g)
    if kind == "heavy":  # Cauchy-like tails over many decades
        return torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp(min=1e-6) ** 2
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "const":  # every value kept: the scale is exactly |c|
        return torch.full((n,), -1.75)
    if kind == "mixed":  # all-zero, constant and random blocks side by side
        x = torch.randn(n, generator=g) * 1e-3
        x[: n // 3] = 0.0
        x[n // 3 : 2 * n // 3] = 2.5
        return x
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- definition


def test_a_hand_computed_block(backend):
    """Ten values, one block: |v| sum 16 (mean 1.6, 0.7 x mean 1.12): 2, 3, 4, 4 kept (1 is not),
    the scale their mean 3.25; trits 0 2 0 1 0 | 0 1 2 0 0 -> bytes 6 + 27 = 33 and 3 + 18 = 21."""
    x = torch.tensor([1.0, -2.0, 0.25, 3.0, -0.5, 0.0, 4.0, -4.0, 0.75, 0.5])
    ef = ErrorFeedback("ternary", 10, block=16)
    buf = ef.encode(x)
    body = buf[HEADER_SIZE:]
    assert len(body) == 4 + 2
    assert struct.unpack("<f", body[:4]) == (3.25,)
    assert tuple(body[4:]) == (33, 21)
    y = decode(buf)
    assert y.tolist() == [0.0, -3.25, 0.0, 3.25, 0.0, 0.0, 3.25, -3.25, 0.0, 0.0]
    assert not torch.signbit(y[[0, 2, 4, 5, 8, 9]]).any()  # zeros are +0.0
    assert ef.residual.tolist() == [1.0, 1.25, 0.25, -0.25, -0.5, 0.0, 0.75, -0.75, 0.75, 0.5]
    assert lc.make_codec("ternary").bytes_per_param() == pytest.approx(0.2078125, abs=1e-8)
    assert lc.make_codec("ternary", scale_dtype="fp16").bytes_per_param() == pytest.approx(
        0.20390625, abs=1e-8
    )


def test_a_value_exactly_at_the_threshold_is_not_sent(backend):
    """|v| = 0.875 = 0.7 x the mean 1.25 (10 u n_b == 7 S exactly): not kept; 4, 2, 2.625 are,
    scale 8.625 / 3 = 2.875."""
    x = torch.tensor([4.0, 0.875, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5, -2.0, 2.625])
    y = decode(encode(x, "ternary", block=10))
    assert y.tolist() == [2.875, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.875, 2.875]


def test_all_zero_and_constant_blocks(backend):
    x = torch.cat([torch.zeros(7), -torch.zeros(7), torch.full((7,), -0.3), torch.tensor([5.0])])
    buf = encode(x, "ternary", block=7)
    s = struct.unpack("<4f", buf[HEADER_SIZE : HEADER_SIZE + 16])
    assert s[:2] == (0.0, 0.0) and s[2] == pytest.approx(0.3, rel=1e-6) and s[3] == 5.0
    y = decode(buf)
    assert torch.equal(y[:14], torch.zeros(14)) and not torch.signbit(y[:14]).any()
    assert bool((y[14:21] == -s[2]).all()) and y[21] == 5.0


def test_scale_does_not_depend_on_the_order_of_the_values(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) * torch.logspace(-6, 3, 4096)
    perm = torch.randperm(4096, generator=g)
    a, b = decode(encode(x, "ternary", block=4096)), decode(encode(x[perm], "ternary", block=4096))
    assert torch.equal(a[perm], b)


def test_error_feedback_residual_is_exactly_what_was_not_sent(backend):
    ef = ErrorFeedback("ternary", 1000, block=64)
    g = torch.Generator().manual_seed(1)
    r0 = torch.zeros(1000)
    for _ in range(3):
        x = torch.randn(1000, generator=g)
        y = decode(ef.encode(x))
        assert torch.equal(ef.residual, (x + r0) - y)  # x + r_old = decode + r_new, in fp32
        assert float(((x + r0).double() - (y.double() + ef.residual.double())).abs().max()) < 1e-6
        r0 = ef.residual.clone()


def test_gaussian_mse_near_the_ternary_optimum_and_below_sign(backend):
    """N(0, 1): threshold 0.7 E|v| gives MSE 1 - (2 phi(t))^2 / (2 (1 - Phi(t))) ~ 0.19; sign
    (one bit) 1 - 2 / pi ~ 0.36."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    mse = {
        name: float(((decode(encode(x, name, block=512)) - x) ** 2).mean())
        for name in ("ternary", "sign")
    }
    assert 0.17 < mse["ternary"] < 0.21, mse
    assert 0.34 < mse["sign"] < 0.38, mse


def test_error_feedback_sum_tracks_the_inputs_with_a_bounded_residual(backend):
    """300 rounds of fresh inputs whose size differs by block (1e-3 .. 1e2): the decoded sum
    equals the input sum less the residual, and the residual stays within a few inputs' size of
    its block (it does not grow with the rounds)."""
    n, block = 3000, 512
    g = torch.Generator().manual_seed(3)
    size = torch.logspace(-3, 2, -(-n // block)).repeat_interleave(block)[:n]
    ef = ErrorFeedback("ternary", n, block=block, scale_dtype="fp16")
    sx = torch.zeros(n, dtype=torch.float64)
    sy = torch.zeros(n, dtype=torch.float64)
    peaks = []
    for _ in range(300):
        x = torch.randn(n, generator=g) * size
        sx += x.double()
        sy += decode(ef.encode(x)).double()
        peaks.append(float((ef.residual / size).abs().max()))
    drift = (sx - sy - ef.residual.double()) / size.double()
    assert float(drift.abs().max()) < 1e-3
    assert max(peaks) < 6.0 and max(peaks[200:]) < 1.5 * max(peaks[:100]), peaks


# ----------------------------------------------------------------------------- kernel == reference


@pytest.fixture(params=[1, 0], ids=["simd-best", "simd-base"])
def simd(request):
    ops = ext_or_skip()
    prev = ops.set_simd(request.param)
    yield ops
    ops.set_simd(prev)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", BLOCKS)
def test_kernel_equals_reference(block, fp16, simd):
    """Payload bytes, residual bits, decode and decode-accumulate bits, over sizes below 5, not
    multiples of 5 or of the block, and heavy-tailed, all-zero and constant data."""
    ops, a = simd, _args(block, fp16)
    g = torch.Generator().manual_seed(block)
    for n in SIZES:
        for kind in ("randn", "heavy", "zeros", "const", "mixed"):
            x = _data(n, kind, g)
            for r0 in (None, torch.randn(n, generator=g) * 0.01):
                p1 = torch.full((ref.payload_nbytes(n, *a),), 0xAB, dtype=torch.uint8)
                p2 = p1.clone()
                r1 = r0.clone() if r0 is not None else None
                r2 = r0.clone() if r0 is not None else None
                st = ops.quantize(x, r1, p1, *a, -1)
                assert st == ref.quantize(x, r2, p2, *a, -1), (n, kind)
                if st:  # fp16 overflow of heavy tails: both report it
                    assert st == ref.OVERFLOW and fp16 and kind == "heavy"
                    continue
                assert torch.equal(p1, p2), (n, kind)
                if r0 is not None:
                    assert torch.equal(_bits(r1), _bits(r2)), (n, kind)
                for acc in (False, True):
                    o1 = torch.randn(n, generator=g)
                    o2 = o1.clone()
                    assert ops.dequantize(p1, o1, *a, acc) == 0 == ref.dequantize(p1, o2, *a, acc)
                    assert torch.equal(_bits(o1), _bits(o2)), (n, kind, acc)


# ----------------------------------------------------------------------------- hostile payloads


def _good_payload(n: int, block: int, fp16: bool) -> torch.Tensor:
    p = torch.empty(ref.payload_nbytes(n, *_args(block, fp16)), dtype=torch.uint8)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert ref.quantize(x, None, p, *_args(block, fp16), -1) == 0
    return p


@pytest.mark.parametrize(
    "scale,why",
    [(-1.0, "scale"), (-0.0, "scale"), (float("inf"), "scale"), (float("nan"), "scale")],
)
def test_bad_scale_is_a_payload_error(scale, why, backend):
    buf = bytearray(encode(torch.randn(20), "ternary", block=8))
    struct.pack_into("<f", buf, HEADER_SIZE + 4, scale)
    out = torch.ones(20)
    with pytest.raises(PayloadError, match=why):
        decode_accumulate(_resign(buf), out)
    assert torch.equal(out, torch.ones(20))


@pytest.mark.parametrize("byte", [243, 250, 255])
def test_a_byte_above_242_is_a_payload_error(byte, backend):
    buf = bytearray(encode(torch.randn(20), "ternary", block=8))
    buf[HEADER_SIZE + 3 * 4 + 1] = byte  # the second trit byte (values 5..9)
    out = torch.ones(20)
    with pytest.raises(PayloadError, match="above 242"):
        decode_accumulate(_resign(buf), out)
    assert torch.equal(out, torch.ones(20))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 22])
def test_a_trit_past_the_last_value_is_a_payload_error(n, backend):
    buf = bytearray(encode(torch.randn(n), "ternary", block=8))
    assert decode(bytes(buf)).numel() == n
    buf[-1] += 3 ** (n % 5)  # the first unused trit: 1 (the byte stays <= 242)
    with pytest.raises(PayloadError, match="padding"):
        decode(_resign(buf))


def test_kernel_validation_equals_reference_on_corrupted_payloads():
    """Random byte changes (several at once included): the same status from the kernel and the
    reference (precedence: scale, byte above 242, padding) and on status 0 the same bits; on any
    error ``out`` is untouched."""
    ops = ext_or_skip()
    rng = random.Random(9)
    g = torch.Generator().manual_seed(10)
    statuses = set()
    for block, fp16 in ((8, False), (7, True), (512, False), (100, True)):
        for n in (1, 4, 23, 1001):
            good, a = _good_payload(n, block, fp16), _args(block, fp16)
            for _ in range(60):
                p = good.clone()
                for _ in range(rng.randint(1, 3)):
                    i = rng.randrange(p.numel())
                    p[i] = rng.choice([0x00, 0xFF, 0x80, 0x7C, 242, 243, rng.randrange(256),
                                       int(p[i]) ^ (1 << rng.randrange(8))])  # fmt: skip
                base = torch.randn(n, generator=g)
                o1, o2 = base.clone(), base.clone()
                s1, s2 = ops.dequantize(p, o1, *a, True), ref.dequantize(p, o2, *a, True)
                assert s1 == s2, (block, fp16, n)
                statuses.add(s2)
                assert torch.equal(_bits(o1), _bits(o2))
                if s2:
                    assert torch.equal(o1, base)
    assert {ref.OK, ref.BAD_SCALE, ref.BAD_TRIT, ref.BAD_PADDING} <= statuses, statuses


def _frames() -> list[bytes]:
    g = torch.Generator().manual_seed(4)
    opts = ({}, {"block": 7, "scale_dtype": "fp16"}, {"block": 64})
    return [encode(torch.randn(n, generator=g) * 10, "ternary", **o)
            for o in opts for n in (1, 4, 7, 130, 513, 2049)]  # fmt: skip


def _trit_mutation(rng: random.Random, buf: bytes) -> bytes:
    """Mutations aimed at the trit bytes (checksums fixed so the content checks run), else the
    generic ones of test_wire (truncation, extension, random fields and bytes)."""
    b = bytearray(buf)
    if rng.random() < 0.4 and len(b) > HEADER_SIZE:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(HEADER_SIZE, len(b))] = rng.choice([242, 243, 255, rng.randrange(256)])
        return _resign(b)
    return _mutate(rng, buf)


@pytest.mark.parametrize("rounds", [2000])
def test_decoder_fuzz_only_payload_error(backend, rounds):
    rng = random.Random(21)
    frames = _frames()
    outcomes = {"ok": 0, "PayloadError": 0}
    for _ in range(rounds):
        buf = _trit_mutation(rng, rng.choice(frames))
        numel = HEADER.unpack_from(buf, 0)[5] if len(buf) >= HEADER_SIZE else 0
        out = torch.ones(min(numel, 1 << 16))
        before = out.clone()
        try:
            y = decode(buf)
        except PayloadError:
            y = None
        try:
            decode_accumulate(buf, out)
        except PayloadError:
            assert torch.equal(out, before)  # never partially applied
        else:
            if y is not None and y.dtype == torch.float32:
                assert torch.equal(out, before + y)
        if y is None:
            outcomes["PayloadError"] += 1
            continue
        assert bool(torch.isfinite(y).all())
        outcomes["ok"] += 1
    assert outcomes["PayloadError"] > rounds // 2 and outcomes["ok"] > rounds // 50, outcomes


# ----------------------------------------------------------------------------- configuration


def test_fp16_overflow_stochastic_rounding_and_k_are_refused(backend):
    with pytest.raises(ValueError, match="does not fit"):
        encode(torch.full((16,), 1e6), "ternary", block=8, scale_dtype="fp16")
    with pytest.raises(ValueError, match="nearest"):
        lc.make_codec("ternary", rounding="stochastic")
    with pytest.raises(ValueError, match="takes options"):
        lc.make_codec("ternary", k=3)
    c = lc.make_codec("ternary")
    assert (c.name, c.codec_id, c.block, c.k_field) == ("ternary", 8, 512, 0)
    buf = encode(torch.randn(10), c)
    assert HEADER.unpack_from(buf, 0)[2] == 8
    fields = list(HEADER.unpack_from(buf, 0))
    fields[7] = 1  # a k field: ternary has none
    with pytest.raises(PayloadError, match="k field"):
        decode(_resign(HEADER.pack(*fields) + buf[HEADER_SIZE:]))
