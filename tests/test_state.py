"""The rank-state seam (``loco.state``): one naming scheme for checkpoints and joins, and a
load that puts a rank back bitwise (1 rank, tiny model, ZeRO stages 0 and 2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loco.checkpoint import CheckpointWriter, capture, latest_checkpoint, read_manifest
from loco.checkpoint.format import layout_json
from loco.checkpoint.reader import Checkpoint
from loco.checkpoint.state import restore, streams_of
from loco.engine.zero import ZeroEngine
from loco.gossip import GossipNode, GossipServer
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.flat_view import FlatView
from loco.outer.join import OUTER_STREAMS, StateServer, adopt, inner_streams, join
from loco.outer.landing import Landing
from loco.outer.loop import OuterLoop
from loco.outer.methods import build_outer
from loco.site_comm import SiteComm
from loco.state import (
    EF_CALLS,
    EF_RESIDUAL,
    LANDING_MISS,
    OPTIM_STEP,
    OUTER_ROUNDS,
    RankState,
    is_outer,
)
from tests.engine.dist_utils import batches, tiny_gpt

NAMES = ["master", "optim.exp_avg", "optim.exp_avg_sq", "outer.phi", "outer.momentum",
         "outer.ef_residual"]  # fmt: skip
H = 4


def make(stage: int, seed: int = 0) -> tuple[ZeroEngine, OuterLoop]:
    """An engine and its outer loop with error feedback (int8 deltas), no gossip node."""
    eng = ZeroEngine(tiny_gpt(seed), stage=stage, optim="adamw", bucket_mb=0.01, lr=1e-2)
    outer = OuterLoop(step=build_outer("noloco"), flat=FlatView(eng), H=H, steps=100)
    opts = codec_options("int8", block=64, scale_dtype="fp32", stochastic=False, topk_fraction=0.1)
    outer.payloads = RangePayloads(shard=(eng.lo, eng.hi), owned=eng.flat_range, codec="int8",
                                   delta_options=opts)  # fmt: skip
    return eng, outer


def step(eng: ZeroEngine, x: torch.Tensor) -> None:
    eng.backward(eng.model(x[:, :-1], x[:, 1:]))
    eng.step(1e-2)


def fill(eng: ZeroEngine, outer: OuterLoop) -> None:
    """Every stream and scalar away from its initial value."""
    for x in batches(2, 2, seed=1):
        step(eng, x)
    lo, hi = eng.flat_range
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(3, hi - lo, generator=g)
    outer.state.phi.copy_(eng.master_range() + 0.01 * noise[0])
    outer.state.momentum.copy_(noise[1])
    outer.payloads.ef.residual[: hi - lo] = noise[2]
    outer.state.rounds, outer.payloads.ef.calls = 3, 7


def test_the_seams_names_are_the_checkpoints(tmp_path):
    eng, outer = make(stage=0)
    fill(eng, outer)
    state = RankState(eng, outer)
    assert list(state.names()) == NAMES
    assert [n for n in NAMES if is_outer(n)] == list(state.outer_names())
    assert [n for n in NAMES if not is_outer(n)] == list(state.inner_names())
    tensors, span, scalars = capture(eng, outer, comm=SiteComm.single())
    assert streams_of(tensors) == NAMES and span == eng.flat_range
    assert {k: scalars[k] for k in (OPTIM_STEP, OUTER_ROUNDS, EF_CALLS)} == state.scalars()
    meta = {"run_id": "t", "layout": layout_json(eng.layout)}
    w = CheckpointWriter(tmp_path, keep=1, meta=meta)
    w.save(2, tensors, range=span, scalars=scalars, manifest={"streams": streams_of(tensors)})
    w.wait()
    assert read_manifest(latest_checkpoint(tmp_path))["streams"] == NAMES
    lean, _, lean_scalars = capture(eng, outer, comm=SiteComm.single(), optimizer=False)
    assert streams_of(lean) == list(state.names(optimizer=False))
    assert OPTIM_STEP not in lean_scalars
    assert RankState(eng).names() == ("master", "optim.exp_avg", "optim.exp_avg_sq")


@pytest.mark.parametrize("stage", [0, 2])
def test_streams_load_into_a_fresh_rank_bitwise(stage):
    eng, outer = make(stage)
    fill(eng, outer)
    src = RankState(eng, outer)
    values = {k: v.clone() for k, v in src.streams().items()}
    scalars = src.scalars()
    eng2, outer2 = make(stage, seed=9)  # another init: everything must come from the values
    dst = RankState(eng2, outer2)
    dst.load(values, scalars)
    got = dst.streams()
    assert list(got) == NAMES
    for k in NAMES:
        assert torch.equal(got[k], values[k]), k
    assert dst.scalars() == scalars
    assert torch.equal(outer2.payloads.ef.residual, outer.payloads.ef.residual)
    # the compute parameters follow: the next step is the same bitwise
    (x,) = batches(1, 2, seed=3)
    step(eng, x)
    step(eng2, x)
    assert torch.equal(eng2.master_range(), eng.master_range())


def test_a_join_fetches_and_adopts_the_seams_names():
    eng, outer = make(stage=0)
    fill(eng, outer)
    server = GossipServer(site="eu", rank=0, nproc=1, flat_size=eng.padded, run_id="run",
                          layout_hash=eng.layout_hash, insecure=True)  # fmt: skip
    server.start()
    server.set_rank_addresses([server.address])
    server.publish(3, "delta", torch.zeros(eng.padded).numpy())  # Hello's current_round
    outer.node = SimpleNamespace(server=server)  # StateServer publishes on the node's server
    StateServer(outer=outer, inner=True).publish(outer.state.rounds)
    eng2, outer2 = make(stage=0, seed=9)
    node = GossipNode(site="us", rank=0, nproc=1, flat_size=eng2.padded, run_id="run",
                      layout_hash=eng2.layout_hash, listen="127.0.0.1:0", heartbeat=False,
                      peers={"eu": server.address}, insecure=True)  # fmt: skip
    node.start()
    try:
        lo, hi = eng2.flat_range
        joined = join(node=node, lo=lo, hi=hi, inner_names=inner_streams(eng2), timeout_s=30)
    finally:
        node.close()
        server.stop(grace=0)
    assert joined is not None and joined.inner and joined.version == 3
    served = [n for n in NAMES if n != EF_RESIDUAL]
    assert sorted(joined.tensors) == sorted(served)
    assert set(OUTER_STREAMS) | set(inner_streams(eng2)) == set(served)
    assert adopt(joined, outer=outer2, engine=eng2, H=H) == 3 * H
    want, got = RankState(eng, outer).streams(served), RankState(eng2, outer2).streams(served)
    for k in served:
        assert torch.equal(got[k], want[k]), k
    assert (eng2.optim_step, outer2.state.rounds) == (3 * H, 3)
    assert not outer2.payloads.ef.residual.any()


def with_landing(outer: OuterLoop) -> Landing:
    """The sequential landing on ``outer``'s payloads (what ``outer.phi_landing`` builds)."""
    opts = codec_options("ternary", block=64, scale_dtype="fp16", stochastic=False,
                         topk_fraction=0.1)  # fmt: skip
    outer.payloads.landing = Landing(outer.payloads, codec="ternary", options=opts)
    return outer.payloads.landing


def test_the_landings_miss_is_checkpointed_and_restored_bitwise(tmp_path):
    """With the sequential landing the site's part of the miss is a range stream: a
    checkpoint holds it and a restore puts it back bitwise (the next coded phi is the same);
    a checkpoint without it restores no miss; a joiner is never served it."""
    eng, outer = make(stage=0)
    fill(eng, outer)
    landing = with_landing(outer)
    state = RankState(eng, outer)
    assert state.names()[-1] == LANDING_MISS and LANDING_MISS not in OUTER_STREAMS
    assert not state.streams([LANDING_MISS])[LANDING_MISS].any()  # nothing landed yet: zero
    lo, hi = eng.flat_range
    landing.landed(torch.randn(hi - lo, generator=torch.Generator().manual_seed(2)))
    tensors, span, scalars = capture(eng, outer, comm=SiteComm.single())
    w = CheckpointWriter(tmp_path, keep=2, meta={"run_id": "t", "layout": layout_json(eng.layout)})
    w.save(2, tensors, range=span, scalars=scalars, manifest={"streams": streams_of(tensors)})
    w.wait()
    eng2, outer2 = make(stage=0, seed=9)
    fresh = with_landing(outer2)
    restore(Checkpoint(latest_checkpoint(tmp_path)), engine=eng2, outer=outer2)
    assert fresh.miss is not None and torch.equal(fresh.miss, landing.miss)
    phi = outer.state.phi
    assert torch.equal(fresh.eff(outer2.state.phi), landing.eff(phi))
    # a checkpoint of a run without the landing: the restored site has no miss
    eng3, outer3 = make(stage=0, seed=3)
    plain, span3, sc3 = capture(eng3, outer3, comm=SiteComm.single())
    assert LANDING_MISS not in plain
    w.save(4, plain, range=span3, scalars=sc3, manifest={"streams": streams_of(plain)})
    w.wait()
    restore(Checkpoint(latest_checkpoint(tmp_path)), engine=eng2, outer=outer2)
    assert fresh.miss is None
