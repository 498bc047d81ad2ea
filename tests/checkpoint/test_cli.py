"""Resume through the real entry point at another rank count and ZeRO stage: a checkpoint of
``site.nproc=2`` continues at ``site.nproc=3`` (stage 3) and at ``site.nproc=1`` (stage 0)
with the losses of the uninterrupted 2-rank run."""

from __future__ import annotations

import shutil

import pytest

from tests.workers import run_worker, train_losses

COMMON = ["+site=eu", "train.seq_len=32", "train.log_every=1", "train.eval_every=1000",
          "train.progress=false", "train.steps=4", "checkpoint.every=2", "outer=local",
          "model.n_layer=2", "model.d_model=64", "model.n_head=2"]  # fmt: skip
GLOBAL = 12  # sequences per step, split over the ranks: the same batches at 1, 2 or 3 ranks


def _resumed(tmp_path, ref: dict[int, float], nproc: int, stage: int) -> None:
    run = tmp_path / f"n{nproc}"
    shutil.copytree(tmp_path / "two" / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step_0000002\n")  # roll back to step 2
    p = run_worker([*COMMON, f"site.nproc={nproc}", f"train.batch_size={GLOBAL // nproc}",
                    f"zero.stage={stage}", "resume=latest"], run)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"at step 2 (resharded from 2 to {nproc} rank(s))" in p.stderr
    got = train_losses(run)
    assert sorted(got) == [3, 4]
    # same state and batches; only the fp32 order of the gradient reduction differs
    # (as in tests/test_train.py: ~1e-7 relative per step, far below 1e-5)
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (nproc, s, got[s], ref[s])


@pytest.mark.slow  # two worker runs: ~40 s on 2 idle cores, 160 s under load
def test_resume_at_three_ranks_stage_3(tmp_path):
    two = run_worker([*COMMON, "site.nproc=2", "train.batch_size=6", "zero.stage=1"],
                     tmp_path / "two")  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    ref = train_losses(tmp_path / "two")
    _resumed(tmp_path, ref, 3, 3)


@pytest.mark.slow
def test_resume_at_one_rank_stage_0(tmp_path):
    two = run_worker([*COMMON, "site.nproc=2", "train.batch_size=6", "zero.stage=1"],
                     tmp_path / "two")  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    _resumed(tmp_path, train_losses(tmp_path / "two"), 1, 0)
