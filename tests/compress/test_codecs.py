"""One conformance suite over every codec, on both backends; hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import loco.compress as lc
from loco.compress import ErrorFeedback, PayloadError, decode, decode_accumulate, encode

from .helpers import CONFIGS, config_id, scales_per_element

HEADER = 40
LOSSY_BOUND = {"int8", "int4", "fp4"}


def _payload(buf: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, offset=HEADER).copy())


def _step_bound(codec, x: torch.Tensor, buf: bytes) -> torch.Tensor:  # noqa: ANN001
    """Half a quantization step at every element (float64), for int8 / int4 / fp4."""
    s = scales_per_element(codec, _payload(buf), x.numel())
    if codec.name == "fp4":
        a = x.double().abs() / torch.where(s > 0, s, torch.ones_like(s))
        gap = torch.where(a <= 2, 0.5, torch.where(a <= 4, 1.0, 2.0))
        return 0.5 * gap * s
    return 0.5 * s


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_roundtrip_shapes_and_sizes(cfg, backend):
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    for n in (0, 1, 5, 129, 1000):
        x = torch.randn(n)
        buf = encode(x, name, **opts)
        assert isinstance(buf, bytes)
        assert len(buf) == HEADER + codec.payload_nbytes(n)
        y = decode(buf)
        assert y.shape == (n,) and y.dtype == torch.float32
        if name == "none":
            assert torch.equal(y, x)
        elif name == "bf16":
            torch.testing.assert_close(y, x, rtol=2**-7, atol=0)
        elif name in LOSSY_BOUND and n:
            err = (x.double() - y.double()).abs()
            bound = _step_bound(codec, x, buf)
            if opts.get("rounding") == "stochastic":
                bound = 2 * bound  # stochastic rounding: within one full step
            assert bool((err <= bound * (1 + 1e-4) + 1e-45).all())


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_encode_is_deterministic_and_seeded(cfg, backend):
    name, opts = cfg
    x = torch.randn(777)
    assert encode(x, name, seed=3, **opts) == encode(x, name, seed=3, **opts)
    if opts.get("rounding") == "stochastic" and name != "topk":
        assert encode(x, name, seed=3, **opts) != encode(x, name, seed=4, **opts)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_decode_accumulate_equals_add(cfg, backend):
    name, opts = cfg
    x = torch.randn(1234)
    buf = encode(x, name, **opts)
    out = torch.randn(1234)
    expected = out + decode(buf)
    decode_accumulate(buf, out)
    assert torch.equal(out, expected)
    # non-contiguous / other-dtype targets take the unfused path with the same result
    out16 = torch.zeros(1234, dtype=torch.float64)
    decode_accumulate(buf, out16)
    torch.testing.assert_close(out16, decode(buf).double())


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_decode_accumulate_rejects_mismatch_and_keeps_out(cfg, backend):
    name, opts = cfg
    buf = encode(torch.randn(100), name, **opts)
    out = torch.randn(99)
    before = out.clone()
    with pytest.raises(PayloadError):
        decode_accumulate(buf, out)
    with pytest.raises(PayloadError):
        decode_accumulate(buf[:-1], torch.zeros(100))
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["none", "int8", "topk"])
def test_dtype_roundtrip(dtype, name, backend):
    x = torch.randn(3, 50, dtype=dtype)
    y = decode(encode(x, name))
    assert y.dtype == dtype and y.shape == (150,)
    if name == "none":
        assert torch.equal(y, x.reshape(-1))


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_nonfinite_input_raises(cfg, backend):
    name, opts = cfg
    for bad in (float("nan"), float("inf")):
        x = torch.randn(100)
        x[17] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode(x, name, **opts)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_error_feedback_sum_tracks_inputs(cfg, backend):
    """sum of decoded payloads = sum of inputs - residual, and the residual stays bounded."""
    name, opts = cfg
    n = 600
    ef = ErrorFeedback(name, n, seed=1, **opts)
    g = torch.Generator().manual_seed(0)
    sum_x = torch.zeros(n, dtype=torch.float64)
    sum_y = torch.zeros(n, dtype=torch.float64)
    peak = 0.0
    for _ in range(40):
        x = torch.randn(n, generator=g)
        buf = ef.encode(x)
        sum_x += x.double()
        sum_y += decode(buf).double()
        peak = max(peak, float(ef.residual.abs().max()))
    drift = sum_x - sum_y - ef.residual.double()
    assert float(drift.abs().max()) < 1e-3
    # bounded: at most a few inputs' worth, not growing with the number of rounds
    limit = {"topk": 60.0, "sparse": 60.0}.get(name, 5.0)
    assert peak < limit, peak


@pytest.mark.parametrize("name", ["int4", "sparse"])
def test_error_feedback_decay_scales_the_kept_residual(name, backend):
    """With decay b the encoder sends x + b r: new residual = x + b r - decoded, exactly."""
    n, b = 4096, 0.5
    opts = {"block": 4096, "k": 64} if name == "sparse" else {}
    ef = ErrorFeedback(name, n, decay=b, **opts)
    plain = ErrorFeedback(name, n, **opts)
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ef.encode(x0)
    plain.encode(x0)
    assert torch.equal(ef.residual, plain.residual)  # the first encode has nothing to decay
    r = ef.residual.clone()
    y = decode(ef.encode(x1))
    assert float((ef.residual - (x1 + b * r - y)).abs().max()) < 1e-5
    assert decode(plain.encode(x1)).ne(y).any()  # the undecayed encoder sends something else
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(name, n, decay=1.5, **opts)


def test_error_feedback_resets_on_nonfinite(backend):
    ef = ErrorFeedback("int8", 300)
    ef.encode(torch.randn(300))
    assert float(ef.residual.abs().max()) > 0
    x = torch.randn(300)
    x[5] = float("nan")
    with pytest.raises(ValueError):
        ef.encode(x)
    assert torch.equal(ef.residual, torch.zeros(300))
    ef.encode(torch.randn(300))  # usable again


def test_error_feedback_state_dict(backend):
    ef = ErrorFeedback("int4", 100, seed=3, rounding="stochastic")
    ef.encode(torch.randn(100))
    other = ErrorFeedback("int4", 100, seed=3, rounding="stochastic")
    other.load_state_dict(ef.state_dict())
    x = torch.randn(100)
    assert ef.encode(x) == other.encode(x)
    with pytest.raises(ValueError):
        ErrorFeedback("int8", 10).encode(torch.randn(11))


def test_user_errors_name_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        encode(torch.randn(4), "int3")
    with pytest.raises(ValueError, match="takes options"):
        encode(torch.randn(4), "int8", k=3)
    with pytest.raises(ValueError, match="even"):
        lc.make_codec("int4", block=3)
    with pytest.raises(ValueError, match="1 <= k <= block"):
        lc.make_codec("topk", block=8, k=9)
    with pytest.raises(ValueError, match="scale_dtype"):
        lc.make_codec("int8", scale_dtype="bf16")
    with pytest.raises(ValueError, match="rounding"):
        lc.make_codec("fp4", rounding="up")
    with pytest.raises(ValueError, match="dtype"):
        encode(torch.arange(4), "int8")
    with pytest.raises(ValueError, match="fp32"):
        encode(torch.full((4,), 1e10), "int8", scale_dtype="fp16")


def test_bytes_per_param_targets():
    assert lc.make_codec("int8").bytes_per_param() <= 1.02
    assert lc.make_codec("int4").bytes_per_param() <= 0.52
    assert lc.make_codec("fp4").bytes_per_param() <= 0.52
    assert lc.make_codec("bf16").bytes_per_param() == 2.0
    assert lc.make_codec("topk").bytes_per_param() < 0.1


def test_codec_protocol():
    for cls in lc.CODECS.values():
        assert isinstance(cls(), lc.Codec)
    c = lc.make_codec("int8", block=64)
    assert lc.make_codec(c) is c
    assert decode(encode(torch.ones(64), c)).eq(1).all()


# ----------------------------------------------------------------------------- properties

_BIG = float(np.float32(1e30))
_floats = st.floats(
    min_value=-_BIG, max_value=_BIG, allow_nan=False, allow_infinity=False, width=32
)
_edge = st.sampled_from(
    [float(np.float32(v)) for v in (0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e-39, 1.0, -1.0, 1e30)]
)
_vec = arrays(np.float32, st.integers(0, 300), elements=st.one_of(_floats, _edge))


@settings(max_examples=150, deadline=None)
@given(
    x=_vec,
    name=st.sampled_from(sorted(LOSSY_BOUND)),
    block=st.sampled_from([2, 8, 64, 256]),
    scale=st.sampled_from(["fp32", "fp16"]),
)
def test_roundtrip_error_at_most_half_step(x, name, block, scale):
    t = torch.from_numpy(x)
    if scale == "fp16" and t.numel() and float(t.abs().max()) > 60000:
        t = t / (float(t.abs().max()) / 60000)  # keep fp16 scales finite
    codec = lc.make_codec(name, block=block, scale_dtype=scale)
    buf = encode(t, codec)
    y = decode(buf)
    if t.numel() == 0:
        assert y.numel() == 0
        return
    err = (t.double() - y.double()).abs()
    bound = _step_bound(codec, t, buf)
    assert bool((err <= bound * (1 + 1e-4) + 1e-45).all())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    name=st.sampled_from(["int8", "int4", "fp4", "bf16", "topk"]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    n=st.integers(1, 200),
    scale=st.floats(1e-6, 1e4),  # fp16 scales (int4/fp4 default) overflow above ~4e5
)
def test_error_feedback_residual_bounded(seed, name, rounding, n, scale):
    g = torch.Generator().manual_seed(seed % 2**31)
    ef = ErrorFeedback(name, n, seed=seed, rounding=rounding)
    total_x = torch.zeros(n, dtype=torch.float64)
    total_y = torch.zeros(n, dtype=torch.float64)
    for _ in range(12):
        x = torch.randn(n, generator=g) * scale
        total_x += x.double()
        total_y += decode(ef.encode(x)).double()
    drift = total_x - total_y - ef.residual.double()
    assert float(drift.abs().max()) <= 1e-4 * scale * 12
    limit = (40.0 if name == "topk" else 3.0) * scale
    assert float(ef.residual.abs().max()) <= limit


_EDGE_INPUTS = {
    "empty": torch.zeros(0),
    "one": torch.tensor([-2.5]),
    "not_multiple": torch.linspace(-3, 3, 257),
    "all_zero": torch.zeros(300),
    "neg_zero": -torch.zeros(300),
    "huge": torch.tensor([2.5e38, -1e38, 3.0, 0.0] * 40),
    "denormal": torch.tensor([1e-40, -3e-42, 1e-45, 0.0] * 40),
    "mixed": torch.tensor([1e30, 1e-30, -1e-40, 7.0] * 40),
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", sorted(_EDGE_INPUTS))
def test_edge_inputs_roundtrip(cfg, kind, backend):
    name, opts = cfg
    x = _EDGE_INPUTS[kind]
    codec = lc.make_codec(name, **opts)
    try:
        buf = encode(x, codec)
    except ValueError as e:  # only "does not fit": bf16 / fp16 scales of huge values
        assert kind in ("huge", "mixed") and "does not fit" in str(e)
        assert name == "bf16" or codec.fp16_scale
        return
    y = decode(buf)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    if name == "none":
        assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    elif name in LOSSY_BOUND and x.numel():
        bound = _step_bound(codec, x, buf)
        if opts.get("rounding") == "stochastic":
            bound = 2 * bound
        err = (x.double() - y.double()).abs()
        assert bool((err <= bound * (1 + 1e-4) + 1e-45).all())
    if kind in ("all_zero", "neg_zero", "empty"):
        assert bool((y == 0).all())


def test_codec_classes_reject_fields_they_do_not_use():
    with pytest.raises(ValueError, match="no blocks"):
        lc.CODECS["none"](block=5)
    with pytest.raises(ValueError, match="no blocks"):
        lc.CODECS["bf16"](scale_dtype="fp16")
    with pytest.raises(ValueError, match="topk only"):
        lc.CODECS["int8"](k=3)
