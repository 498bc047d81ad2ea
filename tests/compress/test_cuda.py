"""CUDA kernels equal the reference bit for bit (runs only with a GPU and a CUDA build).

Every codec: none, bf16, int8, int4 and fp4 run the CUDA kernels (the warp-per-block fast path
for blocks of 64-1024 values, the general path for other blocks, misaligned views and the last
partial block); sparse runs one thread block per chunk (radix select, ordered compaction, bit
packing); ternary one thread block per codec block (scales), then one thread per payload byte;
top-k and sign run on the host and must give the CPU's bytes too.
"""

from __future__ import annotations

import random

import pytest
import torch

import loco.compress as lc
from loco.compress import reference as ref

from .helpers import CONFIGS, config_id, ext_or_skip, op_args
from .test_kernels import KINDS, _inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Beyond the shared configs: every fast-path block size, and int8 with fp16 scales at a block
# count that leaves the codes 2-byte aligned (general path).
CUDA_CONFIGS = [c for c in CONFIGS if c[0] not in ("topk", "sign")] + [  # no CUDA kernels
    ("int8", {"block": 64}),
    ("int8", {"block": 128, "scale_dtype": "fp16"}),
    ("int8", {"block": 512}),
    ("int8", {"block": 1024, "rounding": "stochastic"}),
    ("int4", {"block": 256}),
    ("int4", {"block": 1024, "scale_dtype": "fp32"}),
    ("fp4", {"block": 512, "rounding": "stochastic"}),
    ("int4", {"block": 96}),  # a multiple of 32 without a fast path
    ("sparse", {"block": 16, "k": 3, "bits": 3}),  # > 8192 chunks: thread blocks loop
    ("sparse", {"block": 65536, "k": 700, "bits": 2, "scale_dtype": "fp16"}),
    ("ternary", {"block": 512, "scale_dtype": "fp16"}),
    ("ternary", {"block": 5}),  # blocks on byte boundaries
    ("ternary", {"block": 1000}),
    ("ternary", {"block": 65536}),  # thread blocks loop over 256 values a thread
]
SIZES = (0, 1, 3, 255, 256, 257, 10_001, 3 * 2**16 + 77)


@pytest.fixture(scope="module")
def ops():
    o = ext_or_skip()
    if not lc._ext.ext_has_cuda():
        pytest.skip("kernels built without CUDA (need a CUDA torch and nvcc)")
    return o


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int32)


def _check_encode(ops, codec, x, r, seed, offset=0):  # noqa: ANN001, ANN202
    """Quantize x (+ r) with the reference on the CPU and the kernel on the GPU; compare all
    bits. ``offset`` places the GPU copies at that many elements into a bigger buffer
    (misaligned for the vector loads)."""
    a = op_args(codec)
    n = x.numel()
    p_cpu = torch.empty(codec.payload_nbytes(n), dtype=torch.uint8)
    r_cpu = r.clone() if r is not None else None
    s_cpu = ref.quantize(x, r_cpu, p_cpu, *a, seed)
    x_gpu = torch.empty(n + offset, device="cuda")[offset:]
    x_gpu.copy_(x)
    r_gpu = None
    if r is not None:
        r_gpu = torch.empty(n + offset, device="cuda")[offset:]
        r_gpu.copy_(r)
    p_gpu = torch.full((p_cpu.numel() + 4 * offset,), 0xAB, dtype=torch.uint8, device="cuda")
    p_gpu = p_gpu[4 * offset :]  # none / bf16 payloads must be 4 / 2-byte aligned
    s_gpu = ops.quantize(x_gpu, r_gpu, p_gpu, *a, seed)
    assert s_gpu == s_cpu
    if s_cpu == 0:
        assert torch.equal(p_gpu.cpu(), p_cpu)
        if r is not None:
            assert torch.equal(_bits(r_gpu), _bits(r_cpu))
    return p_cpu


@pytest.mark.parametrize("cfg", CUDA_CONFIGS, ids=config_id)
def test_cuda_matches_reference(cfg, ops):
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    seed = 99 if opts.get("rounding") == "stochastic" else -1
    a = op_args(codec)
    g = torch.Generator().manual_seed(0)
    for n in SIZES:
        x = torch.randn(n, generator=g) * 5
        r = torch.randn(n, generator=g) * 0.1
        p_cpu = _check_encode(ops, codec, x, r, seed)
        _check_encode(ops, codec, x, None, seed)
        _check_encode(ops, codec, x, r, seed, offset=1)  # misaligned: general path
        for acc in (False, True):
            for offset in (0, 1):
                o_cpu = torch.randn(n, generator=g)
                o_gpu = torch.empty(n + offset, device="cuda")[offset:]
                o_gpu.copy_(o_cpu)
                p_gpu = torch.empty(p_cpu.numel() + offset, dtype=torch.uint8, device="cuda")
                p_gpu = p_gpu[offset:]
                p_gpu.copy_(p_cpu)
                assert ref.dequantize(p_cpu, o_cpu, *a, acc) == 0
                assert ops.dequantize(p_gpu, o_gpu, *a, acc) == 0
                assert torch.equal(_bits(o_gpu), _bits(o_cpu)), (name, opts, n, acc, offset)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "bf16", "sparse", "ternary"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_edge_inputs(name, kind, ops):
    """Zeros, -0, huge, denormal, tiny, ties and wide exponents: same status and bits."""
    codec = lc.make_codec(name)
    for n in (1, 257, 4099):
        _check_encode(ops, codec, _inputs(n, kind, seed=n), None, -1)


@pytest.mark.parametrize("name", ["none", "bf16", "int8", "int4", "fp4", "sparse", "ternary"])
def test_cuda_statuses(name, ops):
    """NaN input -> status 1; a bad scale or value -> the reference's status, out untouched."""
    codec = lc.make_codec(name)
    a = op_args(codec)
    x = torch.randn(1000)
    x[517] = float("nan")
    _check_encode(ops, codec, x, torch.zeros(1000), -1)
    good = torch.empty(codec.payload_nbytes(1001), dtype=torch.uint8)
    assert ref.quantize(torch.randn(1001), None, good, *a, -1) == 0
    # NaN scale / NaN value at the start, inside and at the very end (the vector loads' tail);
    # the payload also at odd byte offsets (byte loads).
    # (Codes cannot be invalid: for the block codecs only the scales, at the start, are.)
    values = codec.codec_id in (ref.NONE, ref.BF16)
    for pos in (0, 517, good.numel() - 4) if values else (0,):
        for offset in (0, 1):
            p = good.clone()
            p[pos : pos + 4] = 0xFF
            o = torch.randn(1001)
            o_gpu = o.cuda()
            p_gpu = torch.empty(p.numel() + offset, dtype=torch.uint8, device="cuda")[offset:]
            p_gpu.copy_(p)
            st = ops.dequantize(p_gpu, o_gpu, *a, True)
            assert st != 0 and st == ref.dequantize(p, o.clone(), *a, True), (pos, offset)
            assert torch.equal(_bits(o_gpu), _bits(o))
    if codec.codec_id in (ref.INT4, ref.FP4):  # 1001 values: the last low nibble is padding
        p = good.clone()
        p[-1] |= 1
        o_gpu = torch.zeros(1001, device="cuda")
        assert ops.dequantize(p.cuda(), o_gpu, *a, True) == ref.BAD_PADDING
        assert not o_gpu.any()


def test_cuda_api_roundtrip(ops):
    x = torch.randn(1000, device="cuda")
    for name in lc.CODECS:  # top-k included (the reference, on the GPU)
        buf = lc.encode(x, name)
        assert buf == lc.encode(x.cpu(), name)
        out = torch.zeros(1000, device="cuda")
        lc.decode_accumulate(buf, out)
        assert torch.equal(out.cpu(), lc.decode(buf))
    for name in ("int8", "int4", "topk", "sparse", "ternary"):
        ef = lc.ErrorFeedback(name, 1000, device="cuda")
        ef_cpu = lc.ErrorFeedback(name, 1000)
        for _ in range(3):
            assert ef.encode(x) == ef_cpu.encode(x.cpu())
        assert torch.equal(ef.residual.cpu(), ef_cpu.residual)


@pytest.mark.parametrize("opts", [{}, {"block": 100, "k": 9, "bits": 3, "scale_dtype": "fp16"}],
                         ids=str)  # fmt: skip
def test_cuda_sparse_validation_equals_reference(opts, ops):
    """Corrupted sparse payloads (scales, padding bits, index order, several at once): the CUDA
    status equals the reference's and ``out`` is untouched on any error; ties, zero chunks and
    chunks of very different scales encode to the CPU's bytes."""
    codec = lc.make_codec("sparse", **opts)
    a = op_args(codec)
    rng, g = random.Random(5), torch.Generator().manual_seed(6)
    n = 3 * codec.block + 7
    good = _check_encode(ops, codec, torch.randn(n, generator=g), None, -1)
    for _ in range(200):
        p = good.clone()
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(p.numel())
            p[i] = rng.choice([0x00, 0xFF, 0x80, 0x7F, int(p[i]) ^ (1 << rng.randrange(8))])
        o = torch.randn(n, generator=g)
        o_gpu = o.cuda()
        st = ops.dequantize(p.cuda(), o_gpu, *a, True)
        o_ref = o.clone()
        assert st == ref.dequantize(p, o_ref, *a, True)
        assert torch.equal(_bits(o_gpu), _bits(o_ref))
    x = torch.randint(-2, 3, (n,), generator=g).float()  # ties everywhere
    x[: codec.block] = 0.0
    x[codec.block : 2 * codec.block] *= 1e-30
    _check_encode(ops, codec, x, torch.randn(n, generator=g) * 1e-3, -1)
    _check_encode(ops, codec, x, None, 123)


@pytest.mark.parametrize("opts", [{"block": 8}, {"block": 7, "scale_dtype": "fp16"}, {}], ids=str)
def test_cuda_ternary_validation_equals_reference(opts, ops):
    """Corrupted ternary payloads (scales, bytes above 242, trits past the end, several at
    once): the CUDA status equals the reference's (precedence: scale, byte, padding) and ``out``
    is untouched on any error; zero, constant and tiny blocks encode to the CPU's bytes."""
    codec = lc.make_codec("ternary", **opts)
    a = op_args(codec)
    rng, g = random.Random(7), torch.Generator().manual_seed(8)
    statuses = set()
    for n in (3, 3 * codec.block + 2):
        good = _check_encode(ops, codec, torch.randn(n, generator=g), None, -1)
        for _ in range(150):
            p = good.clone()
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(p.numel())
                p[i] = rng.choice([0x00, 0xFF, 0x80, 242, 243, int(p[i]) ^ (1 << rng.randrange(8))])
            o = torch.randn(n, generator=g)
            o_gpu = o.cuda()
            st = ops.dequantize(p.cuda(), o_gpu, *a, True)
            o_ref = o.clone()
            assert st == ref.dequantize(p, o_ref, *a, True)
            statuses.add(st)
            assert torch.equal(_bits(o_gpu), _bits(o_ref))
    assert {ref.OK, ref.BAD_SCALE, ref.BAD_TRIT} <= statuses, statuses
    n = 4 * codec.block + 3
    x = torch.randn(n, generator=g)
    x[: codec.block] = 0.0
    x[codec.block : 2 * codec.block] = -2.5
    x[2 * codec.block : 3 * codec.block] *= 1e-40
    _check_encode(ops, codec, x, torch.randn(n, generator=g) * 1e-3, -1)
    _check_encode(ops, codec, x, None, -1)
