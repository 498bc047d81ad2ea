"""Expert rows owned by the ranks computing them at ZeRO stage 2 (``loco.engine.experts``): a
rank's compute copy holds the dense part and only its experts, the masters stay on the uniform
shards, and training is the run whose compute copy holds every expert (bitwise at 2 ranks). The
copy is compacted only where it saves memory: with bf16 compute, or in fp32 (where the masters
then need their own P/N values) when X (1 - 1/ep) > P/N."""

from __future__ import annotations

import pytest
import torch

from tests.engine.dist_utils import run_ranks
from tests.moe.test_expert_ownership import STEPS, _expected_sends, _train

BF16 = {"compute_dtype": "bf16", "reduce_dtype": "bf16"}
OPTS = {"experts": 4, "capacity_factor": 4.0}


def _check(rank: int, world: int, ep: int, opts: dict, engine_kw: dict) -> None:
    torch.set_num_threads(1)
    kw = {"stage": 2, **engine_kw}
    ref_losses, ref_master, ref, ref_site = _train(rank, world, ep, False, opts, kw)
    losses, master, eng, site = _train(rank, world, ep, True, opts, kw)
    if world == 2:  # bitwise: the same values reach the same kernels, a sum of two is a sum
        assert losses == ref_losses
        assert torch.equal(master, ref_master)
    else:  # the dense buckets reduce in other pieces: gloo sums 4 values in another order
        assert losses == pytest.approx(ref_losses, rel=1e-5)  # tests/engine/parity.py's
        assert torch.allclose(master, ref_master, rtol=0, atol=2e-5)
    full, ref_full = eng.full_state_dict(), ref.full_state_dict()
    assert full.keys() == ref_full.keys()
    assert all(torch.allclose(full[k], ref_full[k], rtol=0, atol=2e-5) for k in full)
    experts = [n for n, _ in eng.model.named_parameters() if ".experts." in n]
    params = dict(eng.model.named_parameters())
    X = sum(eng.layout.spec(n).numel for n in experts)
    shard = eng.padded // world
    pays = eng.compute_dtype != torch.float32 or X - X // ep > shard
    assert (eng.compact is not None) == pays
    if not pays:  # fp32 at ep = N = 2: X/2 < P/2, the full copy stays (the masters its views)
        assert eng.flat_param.numel() == eng.padded
        assert all(params[n].shape[0] == opts["experts"] for n in experts)
        return
    assert experts and all(params[n].shape[0] == opts["experts"] // ep for n in experts)
    # the compute copy: P - X + X/ep values (the reference's: the padded flat space)
    assert eng.flat_param.numel() == eng.layout.numel - X + X // ep
    assert ref.flat_param.numel() == eng.padded
    assert eng.master.numel() == eng.grad.numel() == shard  # the uniform shards
    # after each step the reference broadcasts every value (``all_gather_shards``), this run
    # the dense ones only and sends the expert rows to the ranks computing them; in backward,
    # expert gradients go point to point to their master's owner instead of into the reduces
    value, grad = eng.compute_dtype.itemsize, eng.reduce_dtype.itemsize
    bcast, ref_bcast = site.stats.bytes["broadcast"], ref_site.stats.bytes["broadcast"]
    assert ref_bcast == value * eng.padded * STEPS
    assert bcast == value * (eng.layout.numel - X) * STEPS
    if "reduce" in ref_site.stats.bytes:
        less = ref_site.stats.bytes["reduce"] - site.stats.bytes["reduce"]
        assert less == grad * X * STEPS * eng.grad_accum
    assert site.stats.bytes.get("send", 0) == _expected_sends(eng, rank, world, ep, STEPS)
    assert "send" not in ref_site.stats.bytes


@pytest.mark.parametrize(
    "engine_kw", [{}, BF16, {**BF16, "grad_accum": 2, "collective": "allreduce"}]
)
def test_stage2_keeps_only_own_experts_where_it_saves_memory(engine_kw):
    run_ranks(_check, 2, 2, OPTS, engine_kw)


def test_stage2_fp32_four_ranks_in_two_expert_groups():
    """ep = 2 on 4 ranks, fp32: X/2 > P/4, so the copy is compacted and the masters get their
    own buffer; rows computed by two ranks are summed by their master's owner."""
    run_ranks(_check, 4, 2, OPTS, {})
