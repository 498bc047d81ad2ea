"""Expert parallelism on real gloo groups: ep ranks computing their experts on every rank's
tokens (all-to-all dispatch and combine) give the loss and gradients of one process holding
every expert, and the all-to-all moves the bytes of the formula."""

from __future__ import annotations

import pytest
import torch

from loco.model.gpt import GPTConfig
from loco.site_comm import SiteComm
from tests.engine.dist_utils import run_ranks
from tests.moe.helpers import CFG, moe_gpt

ROWS = 4  # per rank


def _reference(world: int, opts: dict, cfg: GPTConfig):
    """Every rank's loss, the mean of their gradients and the batch, computed by one model of
    all experts."""
    m = moe_gpt(cfg=cfg, **opts).train()
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, cfg.vocab_size, (world * ROWS, cfg.seq_len), generator=g)
    losses = []
    for r in range(world):
        rows = x[r * ROWS : (r + 1) * ROWS]
        losses.append(m(rows, rows))
    full = m(x, x)  # the whole batch at once: the site-wide regularisers
    full.backward()
    return [float(v) for v in losses], [p.grad.clone() for p in m.parameters()], x


def _check(rank: int, world: int, ep: int, opts: dict, cfg: GPTConfig = CFG) -> None:
    torch.set_num_threads(1)
    site = SiteComm()
    ref_losses, ref_grads, x = _reference(world, opts, cfg)
    m = moe_gpt(cfg=cfg, **opts).train()
    m.ep = ep
    m.bind_site(site)
    rows = x[rank * ROWS : (rank + 1) * ROWS]
    loss = m(rows, rows)
    # the cross-entropy of this rank's rows; capacity is large enough that nothing drops
    assert float(loss) == pytest.approx(ref_losses[rank], rel=1e-6, abs=1e-6)
    loss.backward()
    for p, want in zip(m.parameters(), ref_grads, strict=True):
        g = site.sum_tensor(p.grad.clone()) / world  # what the engine's gradient mean does
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6), float((g - want).abs().max())
    # 2 all-to-alls forward + 2 backward per MoE layer, each of the (E, C, d) fp32 buffer
    group = m.moe_layers()[0].experts.comm
    want_bytes = sum(4 * layer.opts.experts * layer.opts.capacity(rows.numel()) * cfg.d_model * 4
                     for layer in m.moe_layers())  # fmt: skip
    assert group.stats.bytes.get("all_to_all", 0) == (want_bytes if ep > 1 else 0)


@pytest.mark.parametrize("k", [1, 2])
def test_two_ranks_sharing_the_experts_match_one_process_holding_all(k):
    run_ranks(_check, 2, 2, {"k": k, "capacity_factor": 4.0})


def test_pyramid_residual_moe_over_two_ranks():
    """PR-MoE (residual, 8 experts in the second half's layer, 4 before) shared by 2 ranks."""
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=2, d_model=32)
    run_ranks(_check, 2, 2, {"residual": True, "pyramid": 8, "capacity_factor": 8.0}, cfg)


@pytest.mark.slow
def test_four_ranks_in_two_expert_groups():
    """ep = 2 on 4 ranks: two groups of 2, each holding the experts once (4 processes)."""
    run_ranks(_check, 4, 2, {"k": 2, "capacity_factor": 8.0})
