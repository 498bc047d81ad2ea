"""Drill: a site killed (``kill -9``) while it writes a checkpoint, restarted from it.

Real ``loco.worker`` processes of a ``loco.local`` federation (eu, us, asia; pairs, one sits
out). Every checkpoint write is slowed (``LOCO_CKPT_SLOW_WRITE_S``) so that the kill lands
inside one: us's process group gets SIGKILL once its rank file of a checkpoint is half
written (checkpoints are at round boundaries: its round's payloads are published, its
partners may still be pulling them, the next round will find it dead). eu and asia keep training (membership drops us within ~0.4 s; a round paired
with it is the local step). us is started again with its own command line and
``resume=latest``: it resumes from the last committed checkpoint, lags the others by its
down time, and catches up through the rounds it is paired in (a partner waits for it at most
``gossip.pull_timeout_s``).
"""

from __future__ import annotations

import math
import time

import pytest

from loco.checkpoint.format import MANIFEST, TMP_PREFIX, steps
from loco.checkpoint.writer import SLOW_ENV
from tests.drills.common import (
    assert_committed,
    assert_kept_training,
    assert_no_nan_applied,
    last_step,
    outer,
    records,
    split_distances,
    start_federation,
    wait_until,
)

SITES = ["eu", "us", "asia"]
H, EVERY, PULL_TIMEOUT = 5, 10, 10.0
DOWN_ROUNDS = 2  # the others run at least this many rounds while us is down
REJOIN = 8  # us pairs again within this many rounds of the others once it trains again
RECOVER = 8  # rounds after that within which the consensus distance is back to its level
SLACK = 1.25  # as tests/drills/common.recovered: pairing is random, single rounds vary ~2x


def _partial_write(ck) -> bool:
    """A checkpoint of us is being written: a half-written rank file, no manifest yet."""
    for d in ck.glob(f"{TMP_PREFIX}step_*"):
        f = d / "rank_00000.bin"
        if f.exists() and f.stat().st_size > 0 and not (d / MANIFEST).exists():
            return True
    return False


def _kill_restart(
    tmp, monkeypatch, steps_total: int, kill_after: int, nproc: int = 1, restart_nproc: int = 1
) -> None:
    # each checkpoint write takes >= 1 s: time to kill inside one. It also paces every site
    # (a save waits for the previous write) at <= EVERY steps a second on any machine, so the
    # run lasts as long in wall time on a fast box as on a loaded one, where a restart
    # (imports, model, gossip) takes 3 to 15 s.
    monkeypatch.setenv(SLOW_ENV, "1.0")
    ov = [f"train.steps={steps_total}", f"outer.H={H}", "gossip.odd=sit_out",
          f"checkpoint.every={EVERY}", f"gossip.pull_timeout_s={PULL_TIMEOUT}"]  # fmt: skip
    fed = start_federation(tmp, SITES, ov, monkeypatch, nprocs=[1, nproc, 1])
    ck = tmp / "us" / "checkpoints"
    try:
        # kill -9 us while it writes a checkpoint after step kill_after
        wait_until("us writing a checkpoint", lambda: steps(ck) and max(steps(ck)) >= kill_after
                   and _partial_write(ck), fed)  # fmt: skip
        t_kill = time.time()
        assert fed.kill("us") == -9
        killed_at = last_step(tmp / "us")
        # the last committed checkpoint is complete, loadable (CRC-checked) and finite, and
        # `latest` names it; the half-written one beside it is not committed
        assert _partial_write(ck), "the kill missed the write"
        man = assert_committed(ck)
        resumed_step = man["step"]
        # the others keep training while it is down
        down = {s: last_step(tmp / s) for s in ("eu", "asia")}
        wait_until("the others to run rounds without us",
                   lambda: all(last_step(tmp / s) >= down[s] + DOWN_ROUNDS * H
                               for s in ("eu", "asia")), fed, timeout=60)  # fmt: skip
        t_restart = time.time()
        fed.restart("us", ["resume=latest", f"site.nproc={restart_nproc}"])
        codes = fed.wait(status_every=0, timeout=240)
    finally:
        fed.stop()
    assert codes == dict.fromkeys(SITES, 0), {
        s: (tmp / s / "worker.log").read_text()[-3000:] for s, c in codes.items() if c
    }
    log = (tmp / "us" / "worker.log").read_text()
    assert f"resumed from {ck / f'step_{resumed_step:07d}'} at step {resumed_step}" in log
    assert_no_nan_applied(tmp, SITES)
    assert_kept_training(tmp, ["eu", "asia"], t_kill, t_restart, H, PULL_TIMEOUT)
    # us trained from its checkpoint to the end; its latest checkpoint is complete
    after = [r for r in records(tmp / "us", "train") if r["time"] >= t_restart]
    assert after and after[0]["step"] <= resumed_step + H and after[-1]["step"] == steps_total
    assert resumed_step <= killed_at + EVERY
    for s in SITES:  # every site's last checkpoint is the end of the run, complete
        assert assert_committed(tmp / s / "checkpoints")["step"] == steps_total
    # us rejoins the pairing: a round after its restart averaged with a partner
    back = [r for r in outer(tmp, "us") if r["time"] >= t_restart]
    live = max(r["round"] for s in ("eu", "asia") for r in outer(tmp, s)
               if r["time"] <= back[0]["time"])  # fmt: skip
    paired = [r["round"] for r in back if r["n"] == 2]
    assert paired and paired[0] <= live + REJOIN, (
        f"us did not pair again (others at {live}): {back}"
    )
    assert any(r["n"] == 2 and "us" in r["partner"].split(",")
               for s in ("eu", "asia") for r in outer(tmp, s) if r["time"] >= t_restart)  # fmt: skip
    # and the consensus distance is back to its pre-fault level RECOVER rounds later
    pre, post = split_distances(tmp, SITES, t_kill, t_restart)
    heal = paired[0] + RECOVER
    post = {k: d for k, d in post.items() if k[1] >= heal}
    assert pre and post, (pre, post)
    bad = {k: d for k, d in post.items() if not (math.isfinite(d) and d <= SLACK * max(pre))}
    assert not bad, f"still apart after us rejoined (pre-fault level {max(pre):.3g}): {bad}"


def test_site_killed_mid_checkpoint_restarts_from_it(tmp_path, monkeypatch):
    _kill_restart(tmp_path, monkeypatch, steps_total=260, kill_after=20)


@pytest.mark.slow
def test_site_of_two_ranks_killed_restarts_on_one_long(tmp_path, monkeypatch):
    """Long form: us runs 2 ranks (its worker and their process group are killed), later in
    the run, and comes back on 1 rank from the same checkpoint (resharded)."""
    _kill_restart(tmp_path, monkeypatch, steps_total=600, kill_after=100, nproc=2,
                  restart_nproc=1)  # fmt: skip
