"""``kill -9`` while a checkpoint is being written: the previous one stays committed and
loadable, ``latest`` keeps naming it, and the half-written directory is never read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from loco.checkpoint import latest_checkpoint, load_full
from loco.checkpoint.format import TMP_PREFIX, steps
from loco.checkpoint.writer import SLOW_ENV
from tests.workers import ROOT

N = 6 << 20  # 24 MiB of fp32: two write chunks, so a slowed write is caught half-way

SCRIPT = f"""
import sys, time, torch
from loco.checkpoint import CheckpointWriter
d = sys.argv[1]
meta = {{"layout": {{"hash": "t", "numel": {N}, "params": []}}}}
w = CheckpointWriter(d, keep=3, meta=meta)
for step in (1, 2):
    x = torch.randn({N}, generator=torch.Generator().manual_seed(step))
    w.save(step, {{"master": x}}, range=(0, {N}), manifest={{"streams": ["master"]}})
    if step == 1:
        w.wait()
        print("committed", flush=True)
time.sleep(60)
"""


def test_kill_during_write_keeps_the_previous_checkpoint(tmp_path):
    env = {**os.environ, SLOW_ENV: "1.0"}  # one second after every 16 MiB chunk
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "committed"
        part = tmp_path / f"{TMP_PREFIX}step_0000002" / "rank_00000.bin"
        deadline = time.time() + 60
        while not (part.exists() and part.stat().st_size > 0):  # the second write is under way
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert 0 < part.stat().st_size < N * 4  # killed half-way
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"
    assert steps(tmp_path) == [1]
    path = latest_checkpoint(tmp_path)
    want = torch.randn(N, generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_full(path)["master"], want)  # checksums verified on the way
