"""Expert rows owned by the ranks computing them at ZeRO stage 3 (``loco.engine.experts``): a
rank's block buffers hold only its experts, the rows move point to point, and training is
bitwise the run that gathers every expert to every rank."""

from __future__ import annotations

import pytest
import torch

from loco.engine.experts import ExpertRows
from loco.engine.zero import ZeroEngine
from loco.site_comm import SiteComm
from tests.engine.dist_utils import run_ranks
from tests.moe.helpers import CFG, moe_gpt

STEPS, ROWS = 4, 4


def _train(rank: int, world: int, ep: int, own: bool, opts: dict, engine_kw: dict):
    """Losses, this rank's masters, the engine and the site's comm after ``STEPS`` steps."""
    m = moe_gpt(**opts).train()
    m.ep = ep
    if not own:  # the reference: no rows declared, every expert gathered to every rank
        m.expert_rows = lambda world: {}
    site = SiteComm()
    m.bind_site(site)
    kw = {"stage": 3, **engine_kw}
    eng = ZeroEngine(m, optim="adamw", lr=1e-2, grad_clip=1.0, comm=site, **kw)
    g = torch.Generator().manual_seed(5)
    accum = eng.grad_accum
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, CFG.vocab_size, (world * ROWS * accum, CFG.seq_len + 1), generator=g)
        mine = x.view(world, accum, ROWS, -1)[rank]
        total = 0.0
        for a in range(accum):
            loss = m(mine[a, :, :-1], mine[a, :, 1:]) / accum
            eng.backward(loss)
            total += float(loss)
        eng.step(1e-2)
        losses.append(total)
    return losses, eng.master_range().clone(), eng, site


def _expected_sends(eng: ZeroEngine, rank: int, world: int, ep: int, gathers: int) -> int:
    """Bytes this rank sends per run, by arithmetic on the uniform shards: a master value of
    an expert row is sent to each other rank computing it at every gather, a gradient value to
    its master's owner once per backward. Rank r computes rows ``r % ep`` of ``ep`` parts."""
    layout, shard = eng.layout, eng.layout.padded_numel(world) // world
    value, grad = eng.compute_dtype.itemsize, eng.reduce_dtype.itemsize
    n = 0
    for spec in layout.specs:
        if ".experts." not in spec.name:
            continue
        part = spec.numel // ep
        for g in range(spec.offset, spec.end):
            owner, j = g // shard, (g - spec.offset) // part
            computers = [c for c in range(world) if c % ep == j]
            if owner == rank:
                n += value * gathers * sum(c != rank for c in computers)
            if rank in computers and owner != rank:
                n += grad * STEPS * eng.grad_accum
    return n


def _check(rank: int, world: int, ep: int, opts: dict, engine_kw: dict) -> None:
    torch.set_num_threads(1)
    ref_losses, ref_master, ref, ref_site = _train(rank, world, ep, False, opts, engine_kw)
    losses, master, eng, site = _train(rank, world, ep, True, opts, engine_kw)
    if world == 2:  # bitwise: the same values reach the same kernels, a sum of two is a sum
        assert losses == ref_losses
        assert torch.equal(master, ref_master)
    else:  # the dense buckets reduce in other pieces: gloo sums 4 values in another order
        assert losses == pytest.approx(ref_losses, rel=1e-5)  # tests/engine/parity.py's
        assert torch.allclose(master, ref_master, rtol=0, atol=2e-5), float(
            (master - ref_master).abs().max()
        )
    experts = [p for n, p in eng.model.named_parameters() if ".experts." in n]
    E = opts["experts"]
    assert experts and all(p.shape[0] == E // ep for p in experts)
    assert eng.model.num_params() == ref.model.num_params() == eng.layout.numel  # all experts
    # the block buffers hold the dense part and this rank's experts: X (1 - 1/ep) fewer
    X = sum(eng.layout.spec(n).numel for n, _ in eng.model.named_parameters() if ".experts." in n)
    size = sum(u.buf.numel() for u in eng.shards.units)
    assert size == eng.layout.numel - X + X // ep
    assert sum(u.buf.numel() for u in ref.shards.units) == eng.layout.numel
    # the broadcasts leave out the expert rows; what moves instead is the arithmetic's
    moe_gathers = 2 * STEPS * eng.grad_accum  # each MoE block: forward and backward
    bcast, ref_bcast = site.stats.bytes["broadcast"], ref_site.stats.bytes["broadcast"]
    assert ref_bcast - bcast == eng.compute_dtype.itemsize * X * moe_gathers
    assert site.stats.bytes.get("send", 0) == _expected_sends(eng, rank, world, ep, moe_gathers)
    assert "send" not in ref_site.stats.bytes


@pytest.mark.parametrize(
    "engine_kw",
    [{}, {"grad_accum": 2, "collective": "allreduce"},
     {"compute_dtype": "bf16", "reduce_dtype": "bf16"}],
)  # fmt: skip
def test_stage3_keeps_only_own_experts_and_trains_bitwise(engine_kw):
    run_ranks(_check, 2, 2, {"experts": 4, "capacity_factor": 4.0}, engine_kw)


@pytest.mark.slow
def test_stage3_four_ranks_in_two_expert_groups():
    """ep = 2 on 4 ranks: two ranks compute each expert; both send its gradient to the owner
    of its master, which sums them."""
    run_ranks(_check, 4, 2, {"experts": 4, "capacity_factor": 4.0}, {})


def test_rows_are_validated():
    m = moe_gpt(experts=4)
    from loco.engine.flat import FlatLayout

    layout = FlatLayout(m)
    name = "blocks.1.mlp.experts.fc_weight"
    with pytest.raises(ValueError, match="2 entries for 3 ranks"):
        ExpertRows(layout, {name: [(0, 2), (2, 4)]}, 3, 0)
    with pytest.raises(ValueError, match=r"outside 4"):
        ExpertRows(layout, {name: [(0, 2), (2, 5)]}, 2, 0)
    assert ExpertRows.of(m, layout, 2, 0) is None  # not bound to 2 ranks: every rank computes all
