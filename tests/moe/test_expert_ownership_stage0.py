"""Expert rows owned at ZeRO stage 0 (``loco.engine.replica``): a rank's compute copy holds the
dense part and its own experts (P - X + X/ep values), its fp32 masters, gradient and moments the
dense part and its uniform shard's experts; the range API (checkpoints, gossip, joins) hands out
the same values as the full-copy run. Training is the full-copy stage-0 run and the one-rank
run to fp32 rounding: the dense gradients are all-reduced in pieces, the global norm is summed
from the shards' norms, and the optimizer's runs are cut between dense and expert values."""

from __future__ import annotations

import pytest
import torch

from loco.engine.zero import ZeroEngine
from loco.site_comm import SiteComm
from tests.engine.dist_utils import run_ranks
from tests.moe.helpers import CFG, moe_gpt

STEPS, ROWS = 8, 4  # ROWS sequences per rank of two, per micro-batch
# capacity S (k = 1): nothing drops, on one rank as on two; 4 experts would not save memory at
# 2 ranks; the load-balancing loss is off (a product of each rank's own routing statistics:
# one rank's is not the mean of two ranks')
OPTS = {"experts": 8, "capacity_factor": 8.0, "aux_coef": 0.0}


def _train(world: int, rank: int, ep: int, own: bool, engine_kw: dict) -> tuple[list, ZeroEngine]:
    """Per-step losses and the engine after ``STEPS`` stage-0 steps on the global batches of a
    two-rank run (this rank's part of them); ``own`` False: every rank's copy holds every
    expert (no rows declared)."""
    m = moe_gpt(**OPTS).train()
    m.ep = ep
    if not own:
        m.expert_rows = lambda world: {}
    site = SiteComm()
    m.bind_site(site)
    eng = ZeroEngine(m, optim="adamw", lr=1e-2, grad_clip=1.0, comm=site,
                     **{"stage": 0, **engine_kw})  # fmt: skip
    g, accum, losses = torch.Generator().manual_seed(5), eng.grad_accum, []
    for _ in range(STEPS):
        x = torch.randint(0, CFG.vocab_size, (2 * ROWS * accum, CFG.seq_len + 1), generator=g)
        mine = x.view(world, accum, 2 * ROWS // world, -1)[rank]
        total = 0.0
        for a in range(accum):
            loss = m(mine[a, :, :-1], mine[a, :, 1:]) / accum
            eng.backward(loss)
            total += float(loss.detach())
        eng.step(1e-2)
        losses.append(total)
    return losses, eng


def _range_state(eng: ZeroEngine) -> dict[str, torch.Tensor]:
    """The range API's values (what checkpoints and joins read), copied."""
    out = {"master": eng.master_range().clone()}
    out.update({k: v.clone() for k, v in eng.optim_state_range().items()})
    return out


def _check_memory(eng: ZeroEngine, ref: ZeroEngine, ep: int) -> None:
    """Copy P - X + X/ep (in the compute dtype); masters, gradient, moments (P - X) + |X in the shard| + the shard's
    padding; the reference: P everywhere."""
    experts = [s for s in eng.layout.specs if ".experts." in s.name]
    X, P = sum(s.numel for s in experts), eng.layout.numel
    in_shard = sum(max(0, min(s.end, eng.hi) - max(s.offset, eng.lo)) for s in experts)
    space = P - X + in_shard + max(0, eng.hi - max(eng.lo, P))
    assert eng.compact is not None and eng.space is not None and ref.space is None
    assert eng.flat_param.numel() == P - X + X // ep
    assert eng.master.numel() == eng.grad.numel() == eng.space.size == space
    assert all(v.numel() == space for v in eng._range.state().values())
    assert ref.flat_param.numel() == ref.grad.numel() == eng.padded
    params = dict(eng.model.named_parameters())
    assert all(params[s.name].shape[0] == OPTS["experts"] // ep for s in experts)


def _check(rank: int, world: int, ep: int, engine_kw: dict, out: str) -> None:
    """Both runs on this rank; its losses and range state saved to ``out.<rank>``."""
    torch.set_num_threads(1)
    ref_losses, ref = _train(world, rank, ep, False, engine_kw)
    losses, eng = _train(world, rank, ep, True, engine_kw)
    _check_memory(eng, ref, ep)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    got, want = _range_state(eng), _range_state(ref)
    torch.save({"losses": losses, "range": got}, f"{out}.{rank}")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=2e-5), k
    full, ref_full = eng.full_state_dict(), ref.full_state_dict()
    assert all(torch.allclose(full[k], ref_full[k], rtol=0, atol=2e-5) for k in ref_full)
    # writes through the range API reach every rank's compute copy (the dense replicas too)
    eng.master_range().mul_(0.5)
    ref.master_range().mul_(0.5)
    eng.sync_params(optim_state=True)
    ref.sync_params(optim_state=True)
    full, ref_full = eng.full_state_dict(), ref.full_state_dict()
    assert all(torch.allclose(full[k], ref_full[k], rtol=0, atol=2e-5) for k in ref_full)
    params = dict(eng.model.named_parameters())
    for i, p in enumerate(eng.layout.params):  # the compute copy is the masters
        name, (a, b) = eng.layout.specs[i].name, eng.rows.kept(i)
        lo = eng.layout.specs[i].offset
        want = full[name].reshape(-1)[a - lo : b - lo].to(p.dtype)
        assert torch.equal(p.detach().reshape(-1), want), name
    assert params


@pytest.mark.parametrize(
    "engine_kw",
    [{}, {"grad_accum": 2},
     pytest.param({"compute_dtype": "bf16", "reduce_dtype": "bf16"}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_stage0_keeps_only_dense_and_own_experts(tmp_path, engine_kw):
    out = str(tmp_path / "ranks")
    run_ranks(_check, 2, 2, engine_kw, out)
    if engine_kw:
        return
    # one rank (every expert, the same global batches): the mean of the two ranks' losses, and
    # the two ranges are its flat vector
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    one, eng = _train(1, 0, 1, True, {})
    two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert two == pytest.approx(one, rel=1e-5)
    want = _range_state(eng)
    for k in want:
        got = torch.cat([r["range"][k] for r in ranks])
        assert torch.allclose(got, want[k], rtol=1e-4, atol=2e-5), k


@pytest.mark.slow
def test_stage0_four_ranks_in_two_expert_groups(tmp_path):
    """ep = 2 on 4 ranks: two ranks compute each expert and send its gradient to the owner of
    its master, which sums them (gloo sums 4 values in another order: tolerance)."""
    run_ranks(_check, 4, 2, {}, str(tmp_path / "losses.pt"))
