"""A site joins a live run: real ``loco.worker`` processes, real gRPC on loopback.

eu (2 ranks) trains alone; once it is past round 2, us (1 rank) starts with ``resume=peer``,
fetches eu's state through FetchState at eu's current round, and trains from there, pairing
with eu in the later rounds. eu's run is longer than the test (it is stopped at the end), so
eu is still live however long us takes to start on a loaded machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loco.federation import free_base_ports
from loco.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_every=1000", "train.eval_batches=2", "train.log_every=10",
    "train.warmup_steps=2", "train.progress=false", "train.threads=1", "gossip.insecure=true",
    "outer.H=10", "outer.join_timeout_s=0", "gossip.pull_timeout_s=20",
    "gossip.heartbeat_s=1", "data.num_shards=3",
]  # fmt: skip


def start(site: str, run: Path, port: int, peer: str, peer_port: int, *extra: str):
    cmd = [sys.executable, "-m", "loco.worker", f"+site={site}", *COMMON,
           f"site.listen=127.0.0.1:{port}", f"site.peers=['{peer}=127.0.0.1:{peer_port}']",
           *extra, f"hydra.run.dir={run}"]  # fmt: skip
    log = open(run.parent / f"{site}.log", "w")  # noqa: SIM115 (closed with the process)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_metrics(path, kind) if path.exists() else []


@pytest.mark.slow  # 42 s to 133 s on the shared 2-core box
@pytest.mark.timeout(600)
def test_a_site_joins_a_live_run_with_the_sources_phi_bitwise(tmp_path):
    eu_port, us_port = free_base_ports(2, 4)
    eu = start("eu", tmp_path / "eu", eu_port, "us", us_port, "site.nproc=2", "train.steps=100000")
    us = None
    try:
        deadline = time.monotonic() + 120
        while not any(r["round"] >= 2 for r in records(tmp_path / "eu", "serve")):
            assert eu.poll() is None, (tmp_path / "eu.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "eu did not reach round 2"
            time.sleep(0.2)
        # us joins at eu's round when it is up (eu may run dozens of rounds meanwhile on a
        # loaded box): its run ends well past that, so it always trains after the join
        now = max(r["round"] for r in records(tmp_path / "eu", "serve"))
        end = (now + 120) * 10
        us = start(
            "us", tmp_path / "us", us_port, "eu", eu_port, "resume=peer", f"train.steps={end}"
        )
        assert us.wait(timeout=400) == 0, (tmp_path / "us.log").read_text()[-3000:]
        assert eu.poll() is None, (tmp_path / "eu.log").read_text()[-3000:]  # live throughout
    finally:
        for p in (eu, us):
            if p is not None and p.poll() is None:
                p.kill()
    (joined,) = records(tmp_path / "us", "join")
    v = joined["round"]
    assert joined["source"] == "eu" and v >= 2 and joined["step"] == v * 10
    served = {r["round"]: r["phi_crc"] for r in records(tmp_path / "eu", "serve")}
    assert (
        joined["phi_crc"] == served[v]
    )  # eu's phi at that round, bitwise (2 ranks' pieces, 1 here)
    steps = [r["step"] for r in records(tmp_path / "us", "train")]
    assert v * 10 < end, (v, end)  # it joined before its run's end
    assert steps[0] == v * 10 + 10 and steps[-1] == end  # trained from there to the end
    outer = records(tmp_path / "us", "outer")
    assert outer[0]["round"] == v + 1 and any(r["n"] == 2 for r in outer)  # paired with eu
    assert "joined the run from eu" in (tmp_path / "us.log").read_text()
