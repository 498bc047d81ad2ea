"""The compiled kernels equal the pure-torch reference bit for bit (deterministic and seeded
stochastic rounding), on both loop builds (AVX2 and baseline)."""

from __future__ import annotations

import pytest
import torch

import loco.compress as lc
from loco.compress import reference as ref

from .helpers import CONFIGS, config_id, ext_or_skip, op_args

SIZES = [0, 1, 2, 3, 7, 16, 255, 256, 257, 1000, 4099]


def _inputs(n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(n, generator=g) * 3
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "neg_zeros":
        return -torch.zeros(n)
    if kind == "huge":
        return (torch.rand(n, generator=g) * 2 - 1) * 2.9e38
    if kind == "denormal":
        return (torch.rand(n, generator=g) * 2 - 1) * 1e-39
    if kind == "tiny":
        return (torch.rand(n, generator=g) * 2 - 1) * 1e-44
    if kind == "ties":  # many equal magnitudes: top-k tie breaking, rounding ties
        return torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    if kind == "exponents":  # magnitudes spanning the whole fp32 range, block by block
        e = torch.randint(-140, 120, (n,), generator=g).float()
        return torch.randn(n, generator=g) * torch.pow(2.0, e)
    raise AssertionError(kind)


KINDS = ["randn", "zeros", "neg_zeros", "huge", "denormal", "tiny", "ties", "exponents"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _run_both(codec, x, residual, seed):  # noqa: ANN001, ANN202
    ops = ext_or_skip()
    args = (*op_args(codec), seed)
    n = x.numel()
    p_ext = torch.full((codec.payload_nbytes(n),), 0xAB, dtype=torch.uint8)
    p_ref = p_ext.clone()
    r_ext = residual.clone() if residual is not None else None
    r_ref = residual.clone() if residual is not None else None
    s_ext = ops.quantize(x, r_ext, p_ext, *args)
    s_ref = ref.quantize(x, r_ref, p_ref, *args)
    return (s_ext, p_ext, r_ext), (s_ref, p_ref, r_ref)


@pytest.fixture(params=[1, 0], ids=["simd-best", "simd-base"])
def simd(request):
    ops = ext_or_skip()
    prev = ops.set_simd(request.param)
    yield request.param
    ops.set_simd(prev)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_reference(cfg, kind, simd):
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    stochastic = opts.get("rounding") == "stochastic"
    for n in SIZES:
        x = _inputs(n, kind, seed=n)
        for with_residual in (False, True):
            residual = _inputs(n, "randn", seed=n + 1) * 0.01 if with_residual else None
            if kind == "huge" and residual is not None:
                residual = None  # x + r would overflow to Inf: tested separately
            seed = 12345 if stochastic else -1
            (se, pe, re), (sr, pr, rr) = _run_both(codec, x, residual, seed)
            msg = f"{name} {opts} n={n} kind={kind} residual={with_residual}"
            assert se == sr, msg
            if se != 0:
                continue  # e.g. bf16 overflow of huge values: both report it
            assert torch.equal(pe, pr), msg
            if residual is not None:
                assert torch.equal(_bits(re), _bits(rr)), msg


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_dequantize_matches_reference(cfg, simd):
    ops = ext_or_skip()
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    args = op_args(codec)
    for n in SIZES:
        x = _inputs(n, "randn", seed=n)
        payload = torch.empty(codec.payload_nbytes(n), dtype=torch.uint8)
        assert ref.quantize(x, None, payload, *args, 7) == 0
        for acc in (False, True):
            base = _inputs(n, "randn", seed=n + 5)
            o_ext, o_ref = base.clone(), base.clone()
            assert ops.dequantize(payload, o_ext, *args, acc) == 0
            assert ref.dequantize(payload, o_ref, *args, acc) == 0
            assert torch.equal(_bits(o_ext), _bits(o_ref)), f"{name} {opts} n={n} acc={acc}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_nonfinite_input_reported(cfg):
    ops = ext_or_skip()
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    args = (*op_args(codec), -1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(300)
        x[123] = bad
        p = torch.empty(codec.payload_nbytes(300), dtype=torch.uint8)
        assert ops.quantize(x, None, p, *args) == ref.NON_FINITE
        assert ref.quantize(x, None, p, *args) == ref.NON_FINITE
    # finite x and residual whose sum overflows
    x = torch.full((10,), 3e38)
    r = torch.full((10,), 3e38)
    p = torch.empty(codec.payload_nbytes(10), dtype=torch.uint8)
    assert ops.quantize(x, r.clone(), p, *args) == ref.NON_FINITE
    assert ref.quantize(x, r.clone(), p, *args) == ref.NON_FINITE


def test_crc32c_matches_reference():
    ops = ext_or_skip()
    g = torch.Generator().manual_seed(0)
    for n in [0, 1, 3, 8, 9, 4095, 4096, 4097, 12287, 12288, 12301, 100_000, (1 << 20) + 7,
              5 * (1 << 20) + 3]:  # fmt: skip
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        got = ops.crc32c(data, 0)
        assert got == ref.crc32c(data), n
        cut = n // 3
        assert ops.crc32c(data[cut:], ops.crc32c(data[:cut], 0)) == got, n


def test_crc32c_known_vectors():
    assert lc.crc32c(b"123456789") == 0xE3069283
    assert ref.crc32c(b"123456789") == 0xE3069283
    assert lc.crc32c(b"") == 0
    assert ref.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert lc.crc32c(bytes(32)) == 0x8A9136AA
    assert lc.crc32c(b"\xff" * 32) == 0x62A8AB43


def test_fp4_rounding_every_boundary(simd):
    """Dense sweep of |v|/s over [0, 6] with every threshold and its neighbours (s = 1)."""
    ops = ext_or_skip()
    t = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    near = torch.cat([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)])
    a = torch.cat([torch.linspace(0, 6, 60001), near.clamp(0, 6)])
    a = torch.cat([a, -a])
    x = torch.stack([torch.full_like(a, 6.0), a], dim=1).reshape(-1)  # block of 2: s = 6/6 = 1
    codec = lc.make_codec("fp4", block=2, scale_dtype="fp32")
    args = op_args(codec)
    p1 = torch.empty(codec.payload_nbytes(x.numel()), dtype=torch.uint8)
    p2 = p1.clone()
    r1, r2 = torch.zeros_like(x), torch.zeros_like(x)
    assert ops.quantize(x, r1, p1, *args, -1) == 0
    assert ref.quantize(x, r2, p2, *args, -1) == 0
    assert torch.equal(p1, p2)
    assert torch.equal(r1.view(torch.int32), r2.view(torch.int32))
