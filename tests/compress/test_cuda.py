"""CUDA kernels equal the reference bit for bit (runs only with a GPU and a CUDA build)."""

from __future__ import annotations

import pytest
import torch

import loco.compress as lc
from loco.compress import reference as ref

from .helpers import CONFIGS, config_id, ext_or_skip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def ops():
    o = ext_or_skip()
    if not lc._ext.ext_has_cuda():
        pytest.skip("kernels built without CUDA (need a CUDA torch and nvcc)")
    return o


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] != "topk"], ids=config_id)
def test_cuda_matches_cpu_reference(cfg, ops):
    name, opts = cfg
    codec = lc.make_codec(name, **opts)
    seed = 99 if opts.get("rounding") == "stochastic" else -1
    a = (codec.codec_id, codec.block, codec.k, codec.fp16_scale)
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 3, 255, 256, 257, 10_001):
        x = torch.randn(n, generator=g) * 5
        r = torch.randn(n, generator=g) * 0.1
        p_cpu = torch.empty(codec.payload_nbytes(n), dtype=torch.uint8)
        r_cpu = r.clone()
        assert ref.quantize(x, r_cpu, p_cpu, *a, seed) == 0
        p_gpu = p_cpu.cuda().fill_(0xAB)
        r_gpu = r.cuda()
        assert ops.quantize(x.cuda(), r_gpu, p_gpu, *a, seed) == 0
        assert torch.equal(p_gpu.cpu(), p_cpu), (name, opts, n)
        assert torch.equal(r_gpu.cpu().view(torch.int32), r_cpu.view(torch.int32))
        for acc in (False, True):
            o_cpu = torch.randn(n, generator=g)
            o_gpu = o_cpu.cuda()
            assert ref.dequantize(p_cpu, o_cpu, *a, acc) == 0
            assert ops.dequantize(p_gpu, o_gpu, *a, acc) == 0
            assert torch.equal(o_gpu.cpu().view(torch.int32), o_cpu.view(torch.int32))


def test_cuda_api_roundtrip(ops):
    x = torch.randn(1000, device="cuda")
    for name in lc.CODECS:
        buf = lc.encode(x, name)
        assert buf == lc.encode(x.cpu(), name)
        out = torch.zeros(1000, device="cuda")
        lc.decode_accumulate(buf, out)
        assert torch.equal(out.cpu(), lc.decode(buf))
    ef = lc.ErrorFeedback("int4", 1000, device="cuda")
    ef_cpu = lc.ErrorFeedback("int4", 1000)
    assert ef.encode(x) == ef_cpu.encode(x.cpu())
    assert torch.equal(ef.residual.cpu(), ef_cpu.residual)
