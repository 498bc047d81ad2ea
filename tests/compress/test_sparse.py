"""The sparse codec (SparseLoCo-style): layout against the written spec, selection, rounding
error, error feedback with a derived bound, header and content checks, configuration."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

import loco.compress as lc
from loco.compress import ErrorFeedback, PayloadError, decode, decode_accumulate, encode
from loco.compress import reference as ref
from loco.compress.wire import HEADER, HEADER_SIZE, Header

from .helpers import ext_or_skip, op_args
from .test_wire import _resign

SPARSE = 6


# ----------------------------------------------------------------------------- the spec


def _spec_decode(buf: bytes) -> tuple[np.ndarray, list[list[int]]]:
    """Decode a sparse frame straight from docs/wire-format.md, in plain Python (fp32 via
    NumPy scalars): the values and the indices sent per chunk."""
    _, _, cid, _, flags, n, block, kf, _, _, _ = HEADER.unpack_from(buf, 0)
    assert cid == SPARSE
    k, bits, ss = kf & 0xFFFFFF, kf >> 24, 2 if flags & 1 else 4
    ib, levels = max(1, (block - 1).bit_length()), 1 << (bits - 1)
    out, sent, off = np.zeros(n, dtype=np.float32), [], HEADER_SIZE
    for c in range(-(-n // block)):
        kb = min(k, n - c * block)
        lo, hi = (np.float32(v) for v in struct.unpack_from("<ee" if ss == 2 else "<ff", buf, off))
        off += 2 * ss
        ibytes, cbytes = (kb * ib + 7) // 8, (kb * bits + 7) // 8
        istream = int.from_bytes(buf[off : off + ibytes], "little")
        cstream = int.from_bytes(buf[off + ibytes : off + ibytes + cbytes], "little")
        off += ibytes + cbytes
        w = (hi - lo) / np.float32(levels - 0.5)
        sent.append([])
        for e in range(kb):
            j = (istream >> (e * ib)) & ((1 << ib) - 1)
            code = (cstream >> (e * bits)) & ((1 << bits) - 1)
            m = np.float32(code & (levels - 1))
            mag = lo + (hi - lo) * np.float32(0.5) if levels == 1 else lo + m * w
            out[c * block + j] = -mag if code >> (bits - 1) else mag
            sent[-1].append(j)
    assert off == len(buf), "records must fill the payload exactly"
    return out, sent


LAYOUTS = [
    {},
    {"block": 32, "k": 4, "bits": 3},
    {"block": 100, "k": 9, "bits": 1, "scale_dtype": "fp16"},
    {"block": 7, "k": 7, "bits": 4},
    {"block": 1000, "k": 33, "bits": 2, "rounding": "stochastic"},
]


@pytest.mark.parametrize("opts", LAYOUTS, ids=str)
def test_frames_follow_the_written_layout_and_selection_rule(opts, backend):
    g = torch.Generator().manual_seed(1)
    codec = lc.make_codec("sparse", **opts)
    for n in (1, 5, 99, 1001, 4097, 9000):
        x = torch.randint(-6, 7, (n,), generator=g).float() * 0.25  # many equal magnitudes
        x[::3] = torch.randn(len(x[::3]), generator=g)
        buf = encode(x, codec, seed=5)
        assert len(buf) == HEADER_SIZE + codec.payload_nbytes(n)
        want, sent = _spec_decode(buf)
        assert torch.equal(decode(buf), torch.from_numpy(want))
        for c, idx in enumerate(sent):  # top-k by |v|, ties to the lower index, ascending
            v = x[c * codec.block : (c + 1) * codec.block].tolist()
            top = sorted(range(len(v)), key=lambda j: (-abs(v[j]), j))[: len(idx)]
            assert idx == sorted(top)


def test_bytes_per_param_and_header_fields():
    assert lc.make_codec("sparse").bytes_per_param() == pytest.approx(120 / 4096, abs=1e-6)
    assert lc.make_codec("sparse", scale_dtype="fp16").bytes_per_param() == pytest.approx(
        116 / 4096, abs=1e-6
    )
    assert lc.make_codec("sparse", bits=4).payload_nbytes(4096) == 8 + 96 + 32
    assert lc.make_codec("sparse", bits=1).payload_nbytes(4097) == 8 + 96 + 8 + (8 + 2 + 1)
    buf = encode(torch.randn(10000), "sparse")
    _, _, cid, _, flags, n, block, kf, plen, _, _ = HEADER.unpack_from(buf, 0)
    assert (cid, flags, n, block, kf) == (SPARSE, 0, 10000, 4096, 64 | 2 << 24)
    assert plen == 2 * 120 + (8 + 96 + 16)  # chunks of 4096, 4096, 1808


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_sent_values_within_half_a_step(bits, scale_dtype, backend):
    """Nearest rounding: |v - decoded| <= (hi - lo) / (2L - 1) for a sent value (half a step;
    the top level is hi - step / 2); 1 bit: <= (hi - lo) / 2 (the midpoint); signs kept; the
    values not sent decode to 0."""
    g = torch.Generator().manual_seed(bits)
    codec = lc.make_codec("sparse", block=512, k=40, bits=bits, scale_dtype=scale_dtype)
    x = torch.randn(5000, generator=g) * torch.rand(5000, generator=g) * 100
    buf = encode(x, codec)
    y = decode(buf).double()
    _, sent = _spec_decode(buf)
    ss = 2 if scale_dtype == "fp16" else 4
    levels = 1 << (bits - 1)
    for c, idx in enumerate(sent):
        off = HEADER_SIZE + c * codec.payload_nbytes(512)
        lo, hi = struct.unpack_from("<ee" if ss == 2 else "<ff", buf, off)
        g_idx = torch.tensor(idx) + c * 512
        err = (x[g_idx].double() - y[g_idx]).abs()
        half = (hi - lo) / (2 if levels == 1 else 2 * levels - 1)
        assert bool((err <= half * (1 + 1e-5) + 1e-30).all()), (c, float(err.max()), half)
        assert bool((torch.sign(y[g_idx]) == torch.sign(x[g_idx].double())).all())
        mask = torch.ones(min(512, 5000 - c * 512), dtype=torch.bool)
        mask[torch.tensor(idx)] = False
        assert bool((y[c * 512 : c * 512 + mask.numel()][mask] == 0).all())


# ----------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize(
    "opts",
    [{}, {"bits": 1}, {"block": 64, "k": 16, "bits": 3}, {"rounding": "stochastic", "bits": 2},
     {"block": 100, "k": 7, "bits": 4, "scale_dtype": "fp16"}],
    ids=str,
)  # fmt: skip
def test_residual_is_exactly_input_plus_residual_minus_decoded(opts, backend):
    g = torch.Generator().manual_seed(2)
    n = 5000
    ef = ErrorFeedback("sparse", n, seed=9, **opts)
    for _ in range(5):
        x = torch.randn(n, generator=g)
        v = x + ef.residual  # fp32, as the kernel's one pass computes it
        buf = ef.encode(x)
        want = v - decode(buf)
        assert torch.equal(ef.residual.view(torch.int32), want.view(torch.int32))


def test_round_robin_signal_is_tracked_exactly(backend):
    """|x| = 1 everywhere, chunk 64, k 16: ties go to the lower index, so the chunk is sent in
    four groups of 16 in turn, each value exact (lo = hi). After round t the group last sent at
    round s holds residual (t - s) x (t x before its first turn): the tracking error
    t x - sum(decoded) is that residual, at most 3 = 64/16 - 1 once every group had a turn."""
    n, block, k = 192, 64, 16
    x = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    ef = ErrorFeedback("sparse", n, block=block, k=k, bits=2)
    total = torch.zeros(n)
    for t in range(1, 14):
        total += decode(ef.encode(x))
        group = (torch.arange(n) % block) // k  # sent at rounds group + 1, group + 5, ...
        age = torch.where(group < t, (t - 1 - group) % (block // k), t)  # t: not sent yet
        assert torch.equal(ef.residual, age.float() * x), t
        assert torch.equal(t * x - total, ef.residual)


def _ef_bound(x: torch.Tensor, block: int, k: int, bits: int) -> torch.Tensor:
    """Per value, the derived bound on |residual| of any input sequence with the chunk norms of
    ``x`` (nearest rounding, bits >= 2, fp32 scales; rho = 1 / (2L - 1), n_c values, X = max |x|):

    * a sent value's error is <= u - lo (lo is a grid level) and <= rho (hi - lo);
      a value not sent keeps u <= lo;
    * so Psi_t = ||r_t||_1 <= Psi_{t-1} + ||x||_1 - k lo_t and Psi_t <= n_c lo_t + k rho hi_t,
      whence Psi <= (n_c / k - 1) ||x||_1 + k rho H and k lo_t <= Psi_{t-1} + ||x||_1;
    * hi_t <= X + max(lo_{t-1}, rho hi_{t-1}); by induction hi_t <= H with
      H = (X + n_c ||x||_1 / k^2) / (1 - rho), and ||r_t||_inf <= max(lo_t, rho hi_t) <= H - X.
    """
    rho = 1.0 / (2 * (1 << (bits - 1)) - 1)
    out = torch.empty(x.numel(), dtype=torch.float64)
    for c0 in range(0, x.numel(), block):
        xc = x[c0 : c0 + block].double()
        nc, kb = xc.numel(), min(k, xc.numel())
        big_x, l1 = float(xc.abs().max()), float(xc.abs().sum())
        h = (big_x + nc * l1 / kb**2) / (1 - rho)
        out[c0 : c0 + nc] = h - big_x
    return out


@pytest.mark.parametrize("block,k,bits", [(64, 16, 2), (256, 32, 3), (100, 10, 4), (4096, 64, 2)])
def test_error_feedback_tracks_a_fixed_signal_within_the_derived_bound(block, k, bits, backend):
    """sum over T rounds of decoded = T x - residual_T (+ fp32 rounding, <= T 2^-22 max|v|), and
    the residual stays within :func:`_ef_bound` in every round (a loose bound when n_c / k is
    large: 4096 / 64 gives ~400x the ~||x||_1 / k seen; tight for 64 / 16)."""
    n, rounds = 3 * block + block // 2, 150
    x = torch.randn(n, generator=torch.Generator().manual_seed(block + bits))
    bound = _ef_bound(x, block, k, bits)
    ef = ErrorFeedback("sparse", n, block=block, k=k, bits=bits)
    total, peak_v = torch.zeros(n, dtype=torch.float64), 0.0
    for t in range(1, rounds + 1):
        peak_v = max(peak_v, float((x + ef.residual).abs().max()))
        total += decode(ef.encode(x)).double()
        assert bool((ef.residual.double().abs() <= bound * (1 + 1e-5)).all()), t
        drift = (t * x.double() - total - ef.residual.double()).abs().max()
        assert float(drift) <= t * 2**-22 * peak_v + 1e-12, t


def test_without_error_feedback_the_same_signal_drifts_past_the_bound(backend):
    """The contrast: re-encoding the fixed signal alone each round, the values never sent pile
    up linearly (T |x|), beyond the bound error feedback keeps."""
    block, k, bits, rounds = 64, 16, 2, 150
    x = torch.randn(3 * block, generator=torch.Generator().manual_seed(1))
    once = decode(encode(x, "sparse", block=block, k=k, bits=bits)).double()
    assert float((rounds * (x.double() - once)).abs().max()) > float(
        _ef_bound(x, block, k, bits).max()
    )


def test_error_feedback_bound_holds_for_changing_inputs(backend):
    """The derivation uses only per-round norms: random inputs with |x| <= X per value."""
    block, k, bits, n = 128, 8, 2, 640
    g = torch.Generator().manual_seed(7)
    ef = ErrorFeedback("sparse", n, block=block, k=k, bits=bits)
    bound = _ef_bound(torch.ones(n), block, k, bits)  # |x_i| <= 1: worst chunk norms
    for _ in range(200):
        ef.encode(torch.rand(n, generator=g) * 2 - 1)
        assert bool((ef.residual.double().abs() <= bound * (1 + 1e-5)).all())


# ----------------------------------------------------------------------------- header checks


def _frame(numel: int, block: int, k_field: int, flags: int = 0, codec_id: int = SPARSE,
           payload: bytes = b"") -> bytes:  # fmt: skip
    head = Header(codec_id, 0, flags, numel, block, k_field, len(payload), lc.crc32c(payload))
    return head.pack(lc.crc32c) + payload


@pytest.mark.parametrize(
    "block,k_field,match",
    [(4096, 64, "bits=0"), (4096, 64 | 5 << 24, "bits=5"), (4096, 64 | 255 << 24, "bits=255"),
     (4096, 0 | 2 << 24, "k=0"), (64, 65 | 2 << 24, "k=65"), (0, 1 | 2 << 24, "block=0"),
     (65537, 64 | 2 << 24, "block=65537"), (1 << 31, 64 | 2 << 24, "block"),
     (65536, 1 | 1 << 24, "values per byte"), (4096, (1 << 24) - 1 | 2 << 24, "k=")],
)  # fmt: skip
def test_every_header_field_is_checked_before_allocation(block, k_field, match):
    buf = _frame(1 << 40, block, k_field)  # a huge numel: nothing may be sized by it first
    with pytest.raises(PayloadError, match=match):
        decode(buf, max_numel=1 << 44)


def test_k_field_of_other_codecs_cannot_carry_bits():
    with pytest.raises(PayloadError, match="k="):  # topk: 64 | 2 << 24 is a k above the block
        decode(_frame(100, 256, 64 | 2 << 24, codec_id=5))
    with pytest.raises(PayloadError, match="k field must be 0"):
        decode(_frame(100, 256, 2 << 24, codec_id=2))


def test_unused_flag_bits_are_refused():
    good = encode(torch.randn(300), "sparse", block=64, k=4)
    fields = list(HEADER.unpack_from(good, 0))
    for bit in (4, 8, 0x80):
        fields[4] = bit
        with pytest.raises(PayloadError, match="flag"):
            decode(_resign(HEADER.pack(*fields) + good[HEADER_SIZE:]))


# ----------------------------------------------------------------------------- content checks

# 70 values, chunks of 32, 32, 6; k 4, 3 bits: index fields of 5 bits (20 bits: 3 bytes, 4
# padding bits), codes 12 bits (2 bytes, 4 padding bits); each record 8 + 3 + 2 = 13 bytes.
_OPTS = {"block": 32, "k": 4, "bits": 3}
_REC = 13


def _good() -> bytearray:
    x = torch.randn(70, generator=torch.Generator().manual_seed(3))
    return bytearray(encode(x, "sparse", **_OPTS))


def _with_indices(buf: bytearray, chunk: int, idx: list[int]) -> bytearray:
    off = HEADER_SIZE + chunk * _REC + 8
    stream = sum(j << (5 * e) for e, j in enumerate(idx))
    buf[off : off + 3] = stream.to_bytes(3, "little")
    return buf


def _bad_payloads() -> dict[str, tuple[bytearray, str]]:
    lo_hi = _good()
    lo_hi[HEADER_SIZE : HEADER_SIZE + 8] = (
        lo_hi[HEADER_SIZE + 4 : HEADER_SIZE + 8] + lo_hi[HEADER_SIZE : HEADER_SIZE + 4]
    )  # hi, lo: the low scale above the high one
    cases = {"lo_above_hi": (lo_hi, "scale")}
    for name, where, val in (("negative_lo", 0, -1.0), ("nan_hi", 4, math.nan),
                             ("inf_hi", 4, math.inf), ("negative_zero_lo", 0, -0.0)):  # fmt: skip
        b = _good()
        b[HEADER_SIZE + _REC + where : HEADER_SIZE + _REC + where + 4] = struct.pack("<f", val)
        cases[name] = (b, "scale")
    b = _good()
    b[HEADER_SIZE + 8 + 2] |= 0x80  # index region, a padding bit of its last byte
    cases["index_padding"] = (b, "padding")
    b = _good()
    b[HEADER_SIZE + 2 * _REC + 8 + 3 + 1] |= 0x10  # last chunk's code region padding
    cases["code_padding"] = (b, "padding")
    cases["repeated_index"] = (_with_indices(_good(), 0, [3, 3, 9, 20]), "indices")
    cases["decreasing_index"] = (_with_indices(_good(), 1, [3, 9, 8, 20]), "indices")
    cases["index_past_last_chunk"] = (_with_indices(_good(), 2, [0, 1, 2, 6]), "indices")
    return cases


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_bad_content_is_refused_and_out_untouched(case, backend):
    buf, match = _bad_payloads()[case]
    frame = _resign(buf)
    with pytest.raises(PayloadError, match=match):
        decode(frame)
    out = torch.randn(70)
    before = out.clone()
    with pytest.raises(PayloadError, match=match):
        decode_accumulate(frame, out)
    assert torch.equal(out, before)


def test_fp16_scale_overflow_names_the_fix(backend):
    with pytest.raises(ValueError, match="fp32"):
        encode(torch.full((10,), 70000.0), "sparse", scale_dtype="fp16")
    y = decode(encode(torch.full((10,), 60000.0), "sparse", scale_dtype="fp16"))
    assert bool(torch.isfinite(y).all())


# ----------------------------------------------------------------------------- kernels


def _varied(n: int, block: int, seed: int, top: int) -> torch.Tensor:
    """Chunks of very different scales (10^-30 .. 10^top: the kernel's candidate threshold from
    the previous chunk misses), all-zero chunks, chunks with fewer non-zeros than k, ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    nb = -(-n // block)
    scale = torch.pow(10.0, torch.randint(-30, top, (nb,), generator=g).float())
    x = x * scale.repeat_interleave(block)[:n]
    for c in range(0, nb, 7):
        x[c * block : (c + 1) * block] = 0.0
    for c in range(3, nb, 11):
        x[c * block + 5 : (c + 1) * block] = 0.0  # 5 non-zero values
    for c in range(5, nb, 13):
        x[c * block : (c + 1) * block] = torch.randint(-2, 3, (min(block, n - c * block),)).float()
    return x


@pytest.mark.parametrize("simd", [1, 0], ids=["simd-best", "simd-base"])
@pytest.mark.parametrize("opts", [{}, {"block": 512, "k": 100, "bits": 3, "scale_dtype": "fp16"},
                                  {"block": 256, "k": 3, "bits": 1, "rounding": "stochastic"}],
                         ids=str)  # fmt: skip
def test_kernel_equals_reference_on_many_chunks(opts, simd):
    """Several parallel tasks of many chunks each, with the inputs of :func:`_varied`."""
    ops = ext_or_skip()
    prev = ops.set_simd(simd)
    try:
        codec = lc.make_codec("sparse", **opts)
        seed = 11 if codec.rounding == "stochastic" else -1
        for n in (300_017, codec.block * 40):
            x = _varied(n, codec.block, n, top=4 if codec.fp16_scale else 30)
            r0 = torch.randn(n) * 1e-3
            outs = []
            for be in (ops, ref):
                p = torch.empty(codec.payload_nbytes(n), dtype=torch.uint8)
                r = r0.clone()
                assert be.quantize(x, r, p, *op_args(codec), seed) == 0
                o = torch.ones(n)
                assert be.dequantize(p, o, *op_args(codec), True) == 0
                outs.append((p, r.view(torch.int32), o.view(torch.int32)))
            assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True)), n
    finally:
        ops.set_simd(prev)


# ----------------------------------------------------------------------------- configuration


def test_config_group_and_options():
    from loco.config import ConfigError, compose
    from loco.outer.exchange import codec_options

    c = compose(["+site=eu", "compression=sparse"]).compression
    assert (c.codec, c.block, c.sparse_k, c.sparse_bits) == ("sparse", 4096, 64, 2)
    opts = codec_options(c.codec, block=c.block, scale_dtype=c.scale_dtype,
                         stochastic=c.stochastic, topk_fraction=c.topk_fraction,
                         sparse_k=c.sparse_k, sparse_bits=c.sparse_bits)  # fmt: skip
    assert opts == {"block": 4096, "scale_dtype": "fp32", "rounding": "nearest", "k": 64,
                    "bits": 2}  # fmt: skip
    assert lc.make_codec("sparse", **opts) == lc.make_codec("sparse")
    for over, words in ((["compression.sparse_bits=5"], ["compression.sparse_bits=5", "1..4"]),
                        (["compression.sparse_k=0"], ["compression.sparse_k=0", "1 <= k"]),
                        (["compression.block=65536", "compression.sparse_k=1"],
                         ["compression.sparse_k", "values per byte", "raise k"])):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            compose(["+site=eu", "compression=sparse", *over])
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
