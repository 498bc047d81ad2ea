"""Universal checkpoints on real gloo groups: save at 2 ranks, load at 3 (stage 3) and at 1
(stage 0) and back at 2; every loaded range equals the saved one bitwise, and the round trip
continues training bit-identically. Optimizer state optional; public reading API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loco.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    capture,
    latest_checkpoint,
    load_full,
    model_state_dict,
    read_manifest,
    restore,
)
from loco.checkpoint.format import layout_json
from loco.checkpoint.state import aliases, streams_of
from loco.engine.zero import ZeroEngine
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.flat_view import FlatView
from loco.outer.loop import OuterLoop
from loco.outer.methods import build_outer
from loco.site_comm import SiteComm
from tests.engine.dist_utils import batches, run_ranks, tiny_gpt

ROWS = 6  # global batch: divisible by 1, 2 and 3 ranks
STREAMS = ("master", "optim.exp_avg", "optim.exp_avg_sq", "outer.phi", "outer.momentum",
           "outer.ef_residual")  # fmt: skip


def make(stage: int, seed: int = 0) -> tuple[ZeroEngine, OuterLoop]:
    eng = ZeroEngine(tiny_gpt(seed), stage=stage, optim="adamw", bucket_mb=0.01, lr=1e-2)
    outer = OuterLoop(step=build_outer("noloco"), flat=FlatView(eng), H=4, steps=100)
    opts = codec_options("int8", block=64, scale_dtype="fp32", stochastic=False, topk_fraction=0.1)
    # the outer loop's own payload state (error feedback on the rank's shard), no gossip node
    outer.payloads = RangePayloads(shard=(eng.lo, eng.hi), owned=eng.flat_range, codec="int8",
                                   delta_options=opts)  # fmt: skip
    return eng, outer


def train(eng: ZeroEngine, rank: int, world: int, steps: int, seed: int) -> list[float]:
    out = []
    for x in batches(steps, ROWS, seed=seed):
        rows = x[rank * ROWS // world : (rank + 1) * ROWS // world]
        loss = eng.model(rows[:, :-1], rows[:, 1:])
        eng.backward(loss)
        eng.step(1e-2)
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        out.append(float(t))
    return out


def full(t: torch.Tensor, lo: int, hi: int, world: int, n: int) -> torch.Tensor:
    """The full-length vector from every rank's ``[lo, hi)`` piece."""
    pieces = [None] * world
    if world > 1:
        dist.all_gather_object(pieces, (lo, hi, t.detach().cpu().clone()))
    else:
        pieces = [(lo, hi, t.detach().cpu().clone())]
    out = torch.empty(n)
    for a, b, v in pieces:
        out[a:b] = v
    return out


def state_now(eng: ZeroEngine, outer: OuterLoop, world: int) -> dict[str, torch.Tensor]:
    lo, hi = eng.flat_range
    ef = outer.payloads.ef.residual[lo - eng.lo : hi - eng.lo]
    opt = eng.optim_state_range()
    vals = [eng.master_range(), opt["exp_avg"], opt["exp_avg_sq"], outer.state.phi,
            outer.state.momentum, ef]  # fmt: skip
    return {s: full(v, lo, hi, world, eng.numel) for s, v in zip(STREAMS, vals, strict=True)}


def save(eng: ZeroEngine, outer: OuterLoop, d: Path, rank: int, world: int, step: int,
         optimizer: bool = True) -> CheckpointWriter:  # fmt: skip
    meta = {"run_id": "test", "layout": layout_json(eng.layout),
            "aliases": aliases(eng.model, eng.layout)}  # fmt: skip
    w = CheckpointWriter(d, comm=SiteComm(), keep=2, meta=meta)
    tensors, span, scalars = capture(eng, outer, comm=SiteComm(), optimizer=optimizer)
    w.save(step, tensors, range=span, scalars=scalars,
           manifest={"round": step // 4, "streams": streams_of(tensors)})  # fmt: skip
    return w


def phase_save(rank: int, world: int, d: str) -> None:
    eng, outer = make(stage=1)
    train(eng, rank, world, 2, seed=1)
    lo, hi = eng.flat_range
    g = torch.Generator().manual_seed(5)  # outer state: a function of the global index
    noise = torch.randn(3, eng.numel, generator=g)
    outer.state.phi.copy_(eng.master_range() + 0.01 * noise[0, lo:hi])
    outer.state.momentum.copy_(noise[1, lo:hi])
    outer.payloads.ef.residual[: hi - lo] = noise[2, lo:hi]
    outer.state.rounds, outer.payloads.ef.calls = 3, 7
    ref = state_now(eng, outer, world)
    w = save(eng, outer, Path(d) / "w2", rank, world, step=2)
    # training goes on while the file is written: the snapshot must not see these steps
    ref["losses"] = torch.tensor(train(eng, rank, world, 2, seed=2), dtype=torch.float64)
    ref["after"] = full(eng.master_range(), lo, hi, world, eng.numel)
    w.wait()
    if rank == 0:
        torch.save(ref, Path(d) / "ref.pt")


def phase_load(rank: int, world: int, d: str, src: str, stage: int, dst: str | None,
               resume: bool) -> None:  # fmt: skip
    ref = torch.load(Path(d) / "ref.pt")
    eng, outer = make(stage=stage, seed=9)  # another init: everything must come from the file
    ck = Checkpoint(latest_checkpoint(Path(d) / src))
    info = restore(ck, engine=eng, outer=outer, comm=SiteComm())
    assert info["step"] == 2 and eng.optim_step == 2
    assert outer.state.rounds == 3 and outer.payloads.ef.calls == 7
    lo, hi = eng.flat_range
    got = state_now(eng, outer, world)
    for s in STREAMS:  # bitwise, on this rank's range and on the assembled vector
        assert torch.equal(got[s][lo:hi], ref[s][lo:hi]), (s, stage, world)
        assert torch.equal(got[s], ref[s]), s
    assert torch.equal(eng.gather_full(), ref["master"])
    if dst is not None:
        save(eng, outer, Path(d) / dst, rank, world, step=2).wait()
    if resume:
        losses = torch.tensor(train(eng, rank, world, 2, seed=2), dtype=torch.float64)
        assert torch.equal(losses, ref["losses"]), (losses, ref["losses"])
        assert torch.equal(eng.gather_full(), ref["after"])


def test_save_at_2_load_at_3_stage3_at_1_and_back(tmp_path):
    d = str(tmp_path)
    run_ranks(phase_save, 2, d)
    run_ranks(phase_load, 3, d, "w2", 3, "w3", False)  # 2 -> 3 ranks, stage 1 -> 3
    phase_load(0, 1, d, "w3", 0, "w1", False)  # 3 -> 1 rank, stage 0 (no process group)
    run_ranks(phase_load, 2, d, "w1", 1, None, True)  # 1 -> 2 ranks: continues bit-identically
    m = read_manifest(latest_checkpoint(tmp_path / "w3"))
    assert m["world"] == 3 and m["step"] == 2 and len(m["files"]) == 3
    assert [f["range"] for f in m["files"]][0][0] == 0
    assert m["files"][-1]["range"][1] == m["layout"]["numel"]

    # the public reading API: full vectors, and a model state dict that loads strictly
    ref = torch.load(tmp_path / "ref.pt")
    flat = load_full(latest_checkpoint(tmp_path / "w2"), what=STREAMS)
    for s in STREAMS:
        assert torch.equal(flat[s], ref[s]), s
    model = tiny_gpt(seed=3)
    model.load_state_dict(model_state_dict(latest_checkpoint(tmp_path / "w1")))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(got, ref["master"])


def test_without_optimizer_state(tmp_path):
    torch.manual_seed(0)
    eng, outer = make(stage=0)
    train(eng, 0, 1, 2, seed=1)
    save(eng, outer, tmp_path / "lean", 0, 1, step=2, optimizer=False).wait()
    save(eng, outer, tmp_path / "full", 0, 1, step=2).wait()
    lean = latest_checkpoint(tmp_path / "lean")
    assert not any(s.startswith("optim.") for s in read_manifest(lean)["streams"])
    # the lean file holds 4 of 6 streams: the moments are 1/3 of the saved state
    sizes = [(latest_checkpoint(tmp_path / k) / "rank_00000.bin").stat().st_size
             for k in ("lean", "full")]  # fmt: skip
    assert sizes[0] < 0.7 * sizes[1]
    want = eng.master_range().clone()
    for path, opt in ((lean, True), (latest_checkpoint(tmp_path / "full"), False)):
        fresh, fouter = make(stage=2, seed=4)
        info = restore(Checkpoint(path), engine=fresh, outer=fouter, optimizer=opt)
        assert any("optimizer state: fresh" in n for n in info["notes"]), info
        assert torch.equal(fresh.master_range(), want)
        assert fresh.optim_step == 0
        assert all(not v.any() for v in fresh.optim_state_range().values())


def test_flipped_byte_is_one_clear_error(tmp_path):
    eng, outer = make(stage=1)
    save(eng, outer, tmp_path, 0, 1, step=1).wait()
    path = latest_checkpoint(tmp_path)
    f = path / "rank_00000.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))
    fresh, fouter = make(stage=1, seed=2)
    with pytest.raises(CheckpointError, match=r"rank_00000\.bin is corrupt") as e:
        restore(Checkpoint(path), engine=fresh, outer=fouter)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    man = path / "manifest.json"
    man.write_bytes(man.read_bytes()[:-20])  # a torn manifest (never happens: renamed last)
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt"):
        Checkpoint(path)


def test_crash_while_replacing_the_same_step_keeps_it_loadable(tmp_path):
    """Saving a step that exists moves the old copy aside, then renames the new one in: a crash
    between the two must still leave `latest` naming a whole, loadable checkpoint."""
    eng, outer = make(stage=1)
    save(eng, outer, tmp_path, 0, 1, step=3).wait()
    path = latest_checkpoint(tmp_path)
    before = load_full(path, what=("master",))["master"]
    path.rename(tmp_path / f".tmp-old-{path.name}")  # the state at the crash
    again = latest_checkpoint(tmp_path)
    assert again == path and (path / "manifest.json").is_file()
    assert torch.equal(load_full(again, what=("master",))["master"], before)
    # and a second save of the same step replaces it whole
    save(eng, outer, tmp_path, 0, 1, step=3).wait()
    assert latest_checkpoint(tmp_path) == path and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("bad", ["no_optim_step", "rng_python", "rng_numpy"])
def test_bad_scalars_are_one_checkpoint_error_before_anything_loads(tmp_path, bad):
    """A manifest (checksum resealed) whose optimizer step is missing or whose saved RNG
    states do not load: one CheckpointError before any weight is touched (KeyError/TypeError
    after the weights were loaded, at 91a3673)."""
    import json

    from loco.checkpoint.format import manifest_crc32

    eng, outer = make(stage=1)
    save(eng, outer, tmp_path, 0, 1, step=1).wait()
    path = latest_checkpoint(tmp_path)
    man = json.loads((path / "manifest.json").read_text())
    sc = man["files"][0]["scalars"]
    if bad == "no_optim_step":
        del sc["optim_step"]
    else:
        sc[bad] = [1, 2, 3] if bad == "rng_python" else ["MT19937", [1], 0, 0, 0.0]
    man.pop("manifest_crc32", None)
    man["manifest_crc32"] = manifest_crc32(man)
    (path / "manifest.json").write_text(json.dumps(man))
    fresh, fouter = make(stage=1, seed=2)
    before = fresh.master_range().clone()
    with pytest.raises(CheckpointError, match="resume from another checkpoint"):
        restore(Checkpoint(path), engine=fresh, outer=fouter)
    assert torch.equal(fresh.master_range(), before)
