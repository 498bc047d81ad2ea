"""MoE on a GPU (skipped without CUDA; run by scripts/gpu_check.sh): the layer's routing,
dispatch and combine on CUDA give the CPU's loss and gradients, and a ZeRO stage-3 engine over
a one-rank NCCL group trains it."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from loco.engine.zero import ZeroEngine
from loco.site_comm import SiteComm
from tests.moe.helpers import CFG, moe_gpt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("opts", [{"k": 1}, {"k": 2}, {"residual": True, "capacity_factor": 0.5}])
def test_cuda_matches_cpu(opts):
    x = torch.randint(
        0, CFG.vocab_size, (4, CFG.seq_len), generator=torch.Generator().manual_seed(3)
    )
    cpu, gpu = moe_gpt(**opts).train(), moe_gpt(**opts).cuda().train()
    a, b = cpu(x, x), gpu(x.cuda(), x.cuda())
    a.backward(), b.backward()
    # fp32 on both (no TF32 for matmuls by default); routing decisions equal unless a tie
    assert float(b) == pytest.approx(float(a), rel=1e-4)
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert torch.allclose(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5), n
    assert cpu.train_metrics() == pytest.approx(gpu.train_metrics(), rel=1e-4, abs=1e-6)


def test_stage3_over_a_one_rank_nccl_group_trains():
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))  # fmt: skip
        try:
            m = moe_gpt(k=2).cuda()
            m.bind_site(SiteComm())
            eng = ZeroEngine(m, stage=3, optim="adamw", lr=1e-2)
            x = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len), device="cuda")
            losses = []
            for _ in range(20):
                loss = m(x, x)
                eng.backward(loss)
                eng.step(1e-2)
                losses.append(float(loss.detach()))
            assert losses[-1] < losses[0] - 0.5  # one batch, 20 steps: it memorises
        finally:
            dist.destroy_process_group()
