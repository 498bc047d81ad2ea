"""The NVMe tier (``zero.offload=nvme``) on CPU runs: the same bits as the in-memory step at
stages 0-3 on 1 and 2 ranks, the range API and checkpoints through the tier (resharded), the
tier's files as scratch (a killed run keeps its last checkpoint), and the capacity run in a
memory cgroup (scripts/bench/nvme_capacity.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loco.checkpoint import Checkpoint, CheckpointWriter, capture, latest_checkpoint, restore
from loco.checkpoint.format import layout_json
from loco.checkpoint.state import aliases, streams_of
from loco.config import ConfigError, ZeroConfig
from loco.engine.zero import ZeroEngine
from loco.site_comm import SiteComm
from tests.engine.dist_utils import batches, run_ranks, tiny_gpt
from tests.workers import ROOT

STEPS, ROWS = 10, 4
PART_MB = 0.01  # 4096 values per part: the tiny model's range streams in ~9 parts


def engine(stage: int, offload: str, d: str, **kw) -> ZeroEngine:
    kw = {"optim": "adamw", "weight_decay": 0.1, "grad_clip": 0.5, "bucket_mb": 0.01, **kw}
    return ZeroEngine(tiny_gpt(), stage=stage, offload=offload, nvme_dir=d,
                      nvme_part_mb=PART_MB, **kw)  # fmt: skip


def train(eng: ZeroEngine, rank: int, world: int, steps: int = STEPS, seed: int = 1) -> list[float]:
    out = []
    for x in batches(steps, ROWS, seed=seed):
        rows = x[rank * ROWS // world : (rank + 1) * ROWS // world]
        loss = eng.model(rows[:, :-1], rows[:, 1:])
        eng.backward(loss)
        eng.step(1e-2)
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        out.append(float(t) / world)
    return out


def finish(eng: ZeroEngine) -> dict:
    """Full masters and this rank's moments; closes the engine (and its tier)."""
    out = {"full": eng.gather_full(), **{k: v.clone() for k, v in eng.optim_state_range().items()}}
    eng.close()
    return out


@pytest.mark.parametrize(
    "stage, kw",
    [(0, {}), (1, {}), (2, {}), (3, {}), (3, {"compute_dtype": "bf16"}),
     (2, {"optim": "sgd", "momentum": 0.9, "nesterov": True})],
)  # fmt: skip
def test_one_rank_same_bits_as_in_memory(tmp_path, stage: int, kw: dict) -> None:
    """10 steps: losses, masters and moments bitwise equal to the in-memory step (the same
    fused kernel runs on each streamed part), and the tier really streamed in parts."""
    ref = engine(stage, "false", "", **kw)
    ref_l = train(ref, 0, 1)
    eng = engine(stage, "nvme", str(tmp_path), **kw)
    tier = eng.tier_step.tier
    assert len(tier.parts) > 3 and eng.optimizer.state == {}
    got_l = train(eng, 0, 1)
    assert got_l == ref_l
    assert tier.bytes_read >= STEPS * tier.numel * 4 * len(tier.names)
    a, b = finish(ref), finish(eng)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(tier.root)  # scratch: gone at close


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stage3_parameters_on_the_tier(tmp_path, dtype: str) -> None:
    """``offload_params=nvme``: the shard of compute parameters leaves memory, every gather
    reads its own pieces from the tier (the next block's prefetched), and the 10 steps keep the
    in-memory bits."""
    ref = engine(3, "false", "", compute_dtype=dtype)
    ref_l = train(ref, 0, 1)
    eng = engine(3, "nvme", str(tmp_path), compute_dtype=dtype, offload_params="nvme")
    params = eng.shards.master
    assert not isinstance(params, torch.Tensor) and "param" in eng.tier_step.tier.names
    assert train(eng, 0, 1) == ref_l
    assert params.waited >= STEPS * 2 * 3 and params.prefetched >= params.waited // 2
    a, b = finish(ref), finish(eng)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _two_ranks(rank: int, world: int, d: str) -> None:
    for stage, kw in ((1, {}), (2, {}), (3, {}), (3, {"offload_params": "nvme"})):
        ref = engine(stage, "false", "")
        ref_l = train(ref, rank, world)
        eng = engine(stage, "nvme", os.path.join(d, f"s{stage}"), **kw)
        assert train(eng, rank, world) == ref_l, (stage, kw)
        a, b = finish(ref), finish(eng)
        assert all(torch.equal(a[k], b[k]) for k in a), (stage, kw)


def test_two_ranks_same_bits_as_in_memory(tmp_path) -> None:
    run_ranks(_two_ranks, 2, str(tmp_path))


@torch.no_grad()
def _loss(eng: ZeroEngine, x: torch.Tensor) -> float:
    return float(eng.model(x[:, :-1], x[:, 1:]))


def test_range_api_goes_through_the_tier(tmp_path) -> None:
    eng = engine(3, "nvme", str(tmp_path))
    train(eng, 0, 1, steps=2)
    x = torch.randint(0, 64, (2, 17))
    before = _loss(eng, x)
    st = eng.state_dict()
    eng.master_range().mul_(0.0)  # written on the staged copy, then committed by sync_params
    eng.sync_params()
    assert torch.count_nonzero(eng.tier_step.tier.load("master")) == 0
    assert _loss(eng, x) == pytest.approx(float(torch.log(torch.tensor(64.0))), rel=1e-4)
    eng.load_state_dict(st)  # master and moments back into the files
    assert _loss(eng, x) == before
    assert torch.equal(eng.tier_step.tier.load("exp_avg")[: eng.numel], st["optim"]["exp_avg"])
    eng.close()


def _save(eng: ZeroEngine, d: Path, step: int) -> CheckpointWriter:
    meta = {
        "run_id": "t",
        "layout": layout_json(eng.layout),
        "aliases": aliases(eng.model, eng.layout),
    }
    w = CheckpointWriter(d, comm=SiteComm(), keep=2, meta=meta)
    tensors, span, scalars = capture(eng, None, comm=SiteComm(), optimizer=True)
    w.save(step, tensors, range=span, scalars=scalars, manifest={"streams": streams_of(tensors)})
    return w


def _phase_save(rank: int, world: int, d: str) -> None:
    eng = engine(2, "nvme", os.path.join(d, "tier"))
    train(eng, rank, world, steps=3)
    pieces = [None] * world
    dist.all_gather_object(
        pieces, (eng.flat_range, {k: v.clone() for k, v in eng.optim_state_range().items()})
    )
    saved = {"full": eng.gather_full(), "moments": pieces}
    w = _save(eng, Path(d) / "ck", 3)
    saved["losses"] = train(eng, rank, world, steps=3, seed=2)  # the snapshot must not see these
    w.wait()
    if rank == 0:
        torch.save(saved, Path(d) / "ref.pt")
    eng.close()


def test_checkpoint_from_the_tier_reshards_into_the_tier(tmp_path) -> None:
    """Save from the tier at 2 ranks (stage 2); restore into the tier at 1 rank (stage 3) and
    in memory (stage 0): masters and moments equal the saved ones bitwise, and the two resumed
    runs continue with the same bits (the 2-rank run's losses within the reduction-order
    rounding of tests/engine/parity.py: rtol 1e-5)."""
    d = str(tmp_path)
    run_ranks(_phase_save, 2, d)
    ref = torch.load(tmp_path / "ref.pt")
    assert not list((tmp_path / "ck").rglob("loco-tier-*"))  # the tier is never in a checkpoint
    runs = []
    for stage, offload in ((3, "nvme"), (0, "false")):
        eng = ZeroEngine(tiny_gpt(seed=7), stage=stage, offload=offload, optim="adamw",
                         weight_decay=0.1, grad_clip=0.5, nvme_dir=str(tmp_path / "t2"),
                         nvme_part_mb=PART_MB,
                         offload_params="nvme" if offload == "nvme" else "none")  # fmt: skip
        info = restore(Checkpoint(latest_checkpoint(tmp_path / "ck")), engine=eng, outer=None,
                       comm=SiteComm())  # fmt: skip
        assert info["step"] == 3 and eng.optim_step == 3
        assert torch.equal(eng.gather_full(), ref["full"])
        moments = eng.optim_state_range()
        for (lo, hi), piece in ref["moments"]:
            for k, v in piece.items():
                assert torch.equal(moments[k][lo:hi], v), (stage, k)
        runs.append(train(eng, 0, 1, steps=3, seed=2))
        eng.close()
    assert runs[0] == runs[1]
    torch.testing.assert_close(
        torch.tensor(runs[0]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
    )


KILLED = """
import sys, time, torch
from pathlib import Path
from tests.engine.test_nvme import engine, train, _save
d = Path(sys.argv[1])
eng = engine(2, "nvme", str(d / "tier"))
train(eng, 0, 1, steps=2)
_save(eng, d / "ck", 2).wait()
torch.save(eng.gather_full(), d / "want.pt")
print(eng.tier_step.tier.root, flush=True)
while True:
    train(eng, 0, 1, steps=1)
"""


def test_killed_run_keeps_its_last_checkpoint_and_the_tier_is_scratch(tmp_path) -> None:
    """kill -9 mid-training (the tier's files being rewritten): the last checkpoint is whole and
    resumes; the tier folder left behind is never read (a new run makes its own)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        root = proc.stdout.readline().strip()
        time.sleep(0.5)  # a few streamed steps later
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert os.path.isdir(root)  # the crash left the scratch files
    eng = engine(2, "nvme", str(tmp_path / "tier"))
    assert eng.tier_step.tier.root != root
    restore(Checkpoint(latest_checkpoint(tmp_path / "ck")), engine=eng, outer=None, comm=SiteComm())
    assert torch.equal(eng.gather_full(), torch.load(tmp_path / "want.pt"))
    eng.close()


def test_config_and_engine_errors(tmp_path) -> None:
    assert ZeroConfig(offload="nvme", nvme_dir=str(tmp_path)).offload == "nvme"
    assert ZeroConfig(offload=True).offload is True  # true keeps meaning cpu
    with pytest.raises(ConfigError, match="nvme_dir"):
        ZeroConfig(offload="nvme")
    with pytest.raises(ConfigError, match="zero.offload"):
        ZeroConfig(offload="disk")
    with pytest.raises(ConfigError, match="nvme_part_mb"):
        ZeroConfig(offload="nvme", nvme_dir="x", nvme_part_mb=0)
    with pytest.raises(ValueError, match="nvme_dir"):
        ZeroEngine(tiny_gpt(), offload="nvme")
    with pytest.raises(ValueError, match="choose false, cpu or nvme"):
        ZeroEngine(tiny_gpt(), offload="ssd")
    with pytest.raises(ConfigError, match="offload_params=nvme needs zero.stage=3"):
        ZeroConfig(stage=2, offload="nvme", nvme_dir="x", offload_params="nvme")
    with pytest.raises(ValueError, match="needs zero.stage=3"):
        ZeroEngine(
            tiny_gpt(), stage=2, offload="nvme", nvme_dir=str(tmp_path), offload_params="nvme"
        )
    with pytest.raises(ValueError, match="needs zero.offload=nvme"):
        ZeroEngine(tiny_gpt(), stage=3, offload_params="nvme")


def _cgroup_ok() -> bool:
    group = "/sys/fs/cgroup/memory"
    return (
        os.geteuid() == 0 and os.access(group, os.W_OK) and os.path.exists(f"{group}/cgroup.procs")
    )


@pytest.mark.skipif(not _cgroup_ok(), reason="needs root and the cgroup-v1 memory controller")
def test_capacity_only_the_tier_fits_under_the_memory_limit(tmp_path) -> None:
    """A ~23M-parameter stage-2 run in a memory cgroup whose limit sits halfway between the
    tier run's peak and the in-memory run's peak (16P vs ~8P bytes of state + buffers): the
    tier run trains with the unrestricted losses, the in-memory run is killed (SIGKILL)."""
    out = subprocess.run([sys.executable, "scripts/bench/nvme_capacity.py", "--dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["direct"]:
        pytest.skip("no O_DIRECT where the test writes: the page cache would hold the tier")
    assert r["peak_free"]["nvme"] < r["limit_bytes"] < r["peak_free"]["false"]
    # the gap is the moments (8P) less the tier's buffers: far above allocator noise
    assert r["peak_free"]["false"] - r["peak_free"]["nvme"] > 4 * r["numel"]
    assert r["rc_capped"] == {"nvme": 0, "false": -signal.SIGKILL}
    assert r["losses_capped_nvme"] == r["losses_free"]["nvme"] == r["losses_free"]["false"]


WORKER = ["model=tiny", "+site=eu", "train.seq_len=64", "train.log_every=1", "train.eval_every=1000",
          "train.progress=false", "site.nproc=2", "train.batch_size=4", "zero.stage=3"]  # fmt: skip


def test_worker_two_ranks_stage3_on_the_tier_same_losses(tmp_path) -> None:
    """The real entry point, 2 gloo ranks, stage 3 with masters, moments and parameters on the
    tier: the in-memory run's losses bitwise, and the tier's scratch folders gone at the end."""
    from tests.workers import run_worker, train_losses

    common = [*WORKER, "train.steps=4"]
    mem = run_worker([*common, "zero.offload=false"], tmp_path / "mem")
    assert mem.returncode == 0, mem.stderr[-2000:]
    tier = tmp_path / "tier"
    nvme = run_worker([*common, "zero.offload=nvme", f"zero.nvme_dir={tier}",
                       "zero.offload_params=nvme"], tmp_path / "nvme")  # fmt: skip
    assert nvme.returncode == 0, nvme.stderr[-2000:]
    assert train_losses(tmp_path / "nvme") == train_losses(tmp_path / "mem")
    assert len(train_losses(tmp_path / "mem")) == 4
    assert list(tier.iterdir()) == []  # both ranks removed their scratch folders at exit


@pytest.mark.slow
def test_worker_killed_on_the_tier_resumes_from_its_checkpoint(tmp_path) -> None:
    """kill -9 of a 2-rank tier run after a checkpoint; ``resume=latest`` on the tier continues
    with the in-memory run's losses bitwise (slow: three worker runs)."""
    from tests.workers import run_worker, train_losses

    common = [*WORKER, "train.steps=12", "checkpoint.every=3", "checkpoint.keep=10"]
    ref = run_worker([*common, "zero.offload=false"], tmp_path / "mem")
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = train_losses(tmp_path / "mem")
    run, nv = tmp_path / "cut", ["zero.offload=nvme", f"zero.nvme_dir={tmp_path / 'tier'}"]
    cmd = [sys.executable, "-m", "loco.worker", *common, *nv, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000003" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_worker([*common, *nv, "resume=latest"], run)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-2000:]
    got = train_losses(run)
    assert got[12] == want[12] and all(got[s] == want[s] for s in got)
