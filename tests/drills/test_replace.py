"""Drill: a site killed (``kill -9``) and replaced by a new joiner with no checkpoint.

Real ``loco.worker`` processes of a ``loco.local`` federation (eu, us, asia; pairs, one sits
out). us's process group gets SIGKILL mid-round (the first inner step after a round
boundary); eu and asia keep training. A new us is started in a fresh run directory (no
checkpoint, ``resume`` left at its default ``none``) with the same address and certificate:
``join.auto`` sees members past round 0 and fetches phi and the outer momentum from the
furthest live one through FetchState, bitwise (the ``join`` record's CRC equals the source's
``serve`` record of that round), and trains from that round on, pairing again.
"""

from __future__ import annotations

import math
import time

import pytest

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
REJOIN = 8  # the joiner pairs within this many rounds of its first one
RECOVER = 4  # rounds after that within which the consensus distance is back to its level
SLACK = 1.25  # as tests/drills/common.recovered: pairing is random, single rounds vary ~2x


def _replace(tmp, monkeypatch, steps_total: int, kill_round: int) -> None:
    # pace: members checkpoint every EVERY steps, each write taking >= 1 s (a member waits for
    # its previous write), so the run lasts as long in wall time on any machine
    monkeypatch.setenv(SLOW_ENV, "1.0")
    ov = [f"train.steps={steps_total}", f"outer.H={H}", "gossip.odd=sit_out",
          f"checkpoint.every={EVERY}", f"gossip.pull_timeout_s={PULL_TIMEOUT}",
          "train.log_every=1"]  # fmt: skip
    fed = start_federation(tmp, SITES, ov, monkeypatch)
    new = tmp / "us-joiner"  # the new site's run dir (site name us, address and certificate)
    try:
        # kill -9 us one inner step into round kill_round + 1 (mid-round)
        wait_until("us mid-round", lambda: last_step(tmp / "us") >= kill_round * H + 1, fed)
        t_kill = time.time()
        assert fed.kill("us") == -9
        killed = assert_committed(tmp / "us" / "checkpoints")  # its last one is intact
        down = {s: last_step(tmp / s) for s in ("eu", "asia")}
        wait_until("the others to run rounds without us",
                   lambda: all(last_step(tmp / s) >= down[s] + DOWN_ROUNDS * H
                               for s in ("eu", "asia")), fed, timeout=60)  # fmt: skip
        t_restart = time.time()
        fed.restart("us", run_dir=new)  # a new site: fresh run dir, no checkpoint
        codes = fed.wait(status_every=0, timeout=240)
    finally:
        fed.stop()
    assert codes == dict.fromkeys(SITES, 0), {
        s: ((new if s == "us" else tmp / s) / "worker.log").read_text()[-3000:]
        for s, c in codes.items() if c
    }  # fmt: skip
    # the joiner took a live member's phi, bitwise, at the member's round then
    (joined,) = records(new, "join")
    v, src = joined["round"], joined["source"]
    assert src in ("eu", "asia") and v >= kill_round + DOWN_ROUNDS, joined
    served = {r["round"]: r["phi_crc"] for r in records(tmp / src, "serve")}
    assert joined["phi_crc"] == served[v], (joined, served.get(v))
    assert f"joined the run from {src} at round {v}" in (new / "worker.log").read_text()
    train = records(new, "train")
    assert train[0]["step"] == v * H + 1 and train[-1]["step"] == steps_total
    # nothing non-finite anywhere; the others kept training while us was down
    assert_no_nan_applied(tmp, ["eu", "asia", "us-joiner"])
    assert killed["step"] >= kill_round * H - EVERY
    for d in ("eu", "asia", "us-joiner"):  # every site's last checkpoint is the end of the run
        assert assert_committed(tmp / d / "checkpoints")["step"] == steps_total
    assert_kept_training(tmp, ["eu", "asia"], t_kill, t_restart, H, PULL_TIMEOUT)
    # the joiner pairs, from its first rounds on
    back = outer(tmp, "us-joiner")
    assert back[0]["round"] == v + 1
    paired = [r["round"] for r in back if r["n"] == 2]
    assert paired and paired[0] < v + 1 + REJOIN, f"the joiner never paired: {back}"
    # and the consensus distance is back to its pre-fault level RECOVER rounds later
    pre, _ = split_distances(tmp, ["eu", "us", "asia"], t_kill, t_restart)
    _, post = split_distances(tmp, ["eu", "asia", "us-joiner"], t_kill, t_restart)
    post = {k: d for k, d in post.items() if k[1] >= paired[0] + RECOVER}
    assert pre and post, (pre, post)
    bad = {k: d for k, d in post.items() if not (math.isfinite(d) and d <= SLACK * max(pre))}
    assert not bad, f"still apart after the joiner came in (pre-fault level {max(pre):.3g}): {bad}"


def test_site_replaced_by_a_joiner_without_checkpoint(tmp_path, monkeypatch):
    _replace(tmp_path, monkeypatch, steps_total=200, kill_round=4)


@pytest.mark.slow
def test_site_replaced_by_a_joiner_without_checkpoint_long(tmp_path, monkeypatch):
    _replace(tmp_path, monkeypatch, steps_total=400, kill_round=20)
