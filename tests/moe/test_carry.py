"""MoE models through the rest of loco: universal checkpoints across expert-parallel degrees
(ep = 2 -> 1 and 1 -> 2), export, ``loco.sample`` (KV cache), a federation of MoE sites with
different rank counts under NoLoCo (outer rounds, range pulls), and a site joining a live MoE
run. The flat parameter space holds every expert on every rank, so none of them needs to know
about experts: these tests check that it holds."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from loco.export import load_model
from loco.federation import free_base_ports, run_federation
from tests.federation.test_join import records, start
from tests.federation.test_local import outer_records
from tests.workers import run_worker, train_losses

COMMON = [
    "+site=eu",
    "model=moe-tiny",
    "model.n_layer=2",
    "model.moe.k=2",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.progress=false",
    "train.steps=4",
    "checkpoint.every=2",
    "outer=local",
    "train.lr=0.01",
    "model.moe.capacity_factor=4",
]  # fmt: skip  (k * S places: nothing drops)
GLOBAL = 8


def _run(run, nproc: int, *extra: str) -> dict[int, float]:
    p = run_worker([*COMMON, f"site.nproc={nproc}", f"train.batch_size={GLOBAL // nproc}",
                    *extra], run)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    return train_losses(run)


def _resume_at(tmp_path, src: str, ref: dict[int, float], nproc: int, stage: int) -> None:
    run = tmp_path / f"resumed{nproc}"
    shutil.copytree(tmp_path / src / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step_0000002\n")  # roll back to step 2
    got = _run(run, nproc, f"zero.stage={stage}", "resume=latest")
    assert sorted(got) == [3, 4]
    # same state, batches and routing; fp32 summation order only (see test_cli.py)
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (nproc, s, got[s], ref[s])


def _cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """A command's ``main(argv)`` in this process: (status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ep2_checkpoint_resumes_at_ep1_and_exports_and_samples(tmp_path, capsys):
    from loco import export, sample

    ref = _run(tmp_path / "two", 2, "zero.stage=3")  # each rank keeps only its experts
    _resume_at(tmp_path, "two", ref, 1, 0)
    # the final model (summary), the checkpoint and an export are one MoE model, bitwise
    run = tmp_path / "two"
    final, _ = load_model(run / "model.safetensors")
    ck, _ = load_model(run)
    assert type(final).__name__ == "MoEGPT" and final.moe.k == 2
    for (n, p), q in zip(final.state_dict().items(), ck.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    out = run / "exp.pt"
    rc, _, err = _cli(export.main, [run, out], capsys)
    assert rc == 0, err
    # loco.sample (KV cache) from the checkpoint and from the export: the same greedy text
    args = ["--prompt", "def ", "--tokens", "16", "--temperature", "0"]
    (ra, a, ea), (rb, b, eb) = (_cli(sample.main, [src, *args], capsys) for src in (run, out))
    assert ra == rb == 0, ea + eb
    assert a == b and a.startswith("def ")
    rc, _, err = _cli(export.main, [run, run / "hf", "--format", "hf"], capsys)
    assert rc == 2 and "no experts" in err


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])  # each rank keeps only its experts (copy, gradient)
def test_ep1_checkpoint_resumes_at_ep2(tmp_path, stage):
    ref = _run(tmp_path / "one", 1)
    _resume_at(tmp_path, "one", ref, 2, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])  # compact copy; gradient shard (1), replica space (0)
def test_ep2_stage_0_1_checkpoint_resumes_at_ep1(tmp_path, stage):
    ref = _run(tmp_path / "two", 2, f"zero.stage={stage}")
    _resume_at(tmp_path, "two", ref, 1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_federation_of_moe_sites_with_different_rank_counts(tmp_path, stage):
    """eu (2 ranks, ep = 2, ZeRO 0-3: each rank keeps only its experts) and us (1 rank,
    ep = 1) under NoLoCo: each rank pulls its range of the flat space (experts included) from
    whichever partner ranks own it; both sites end on the same parameters."""
    out = run_federation(
        ["federation.sites=[eu,us]", "federation.nproc=[2,1]", "train.steps=15", "outer.H=5",
         "gossip.insecure=true", f"zero.stage={stage}", "model=moe-tiny", "model.n_layer=2",
         "train.batch_size=4", "train.seq_len=32", "train.eval_every=10", "train.eval_batches=2",
         "train.log_every=5", "train.warmup_steps=2", "train.lr=3e-3", "outer.final_average=true"],
        tmp_path, timeout=200,
    )  # fmt: skip
    rows = {r["site"]: r for r in out["sites"]}
    assert all(r["exit"] == 0 for r in rows.values()), rows
    recs = outer_records(tmp_path, ["eu", "us"])
    assert all(r["n"] == 2 for rs in recs.values() for r in rs)
    a, b = rows["eu"]["final_params_crc32"], rows["us"]["final_params_crc32"]
    assert a is not None and a == b


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_site_joins_a_live_moe_run(tmp_path):
    """us (1 rank) joins eu (2 ranks, ep = 2) mid-run with resume=peer: eu's phi, bitwise."""
    eu_port, us_port = free_base_ports(2, 4)
    moe = ("model=moe-tiny",)
    eu = start("eu", tmp_path / "eu", eu_port, "us", us_port, *moe, "site.nproc=2",
               "train.steps=100000")  # fmt: skip
    us = None
    try:
        deadline = time.monotonic() + 180
        while not any(r["round"] >= 2 for r in records(tmp_path / "eu", "serve")):
            assert eu.poll() is None, (tmp_path / "eu.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "eu did not reach round 2"
            time.sleep(0.2)
        us = start("us", tmp_path / "us", us_port, "eu", eu_port, *moe, "resume=peer",
                   "train.steps=400")  # fmt: skip
        assert us.wait(timeout=400) == 0, (tmp_path / "us.log").read_text()[-3000:]
    finally:
        for p in (eu, us):
            if p is not None and p.poll() is None:
                p.kill()
    (joined,) = records(tmp_path / "us", "join")
    served = {r["round"]: r["phi_crc"] for r in records(tmp_path / "eu", "serve")}
    assert joined["source"] == "eu" and joined["phi_crc"] == served[joined["round"]]
    assert any(r["n"] == 2 for r in records(tmp_path / "us", "outer"))  # paired with eu
