"""Outer state (phi, momentum, rounds) is checkpointed per rank: resume equals a straight run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "+site=eu", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "outer=local",
    "outer.H=5", "train.batch_size=4", "train.seq_len=32", "train.eval_every=10",
    "train.eval_batches=2", "train.progress=false", "train.threads=1", "train.warmup_steps=2",
    "checkpoint.every=10",
]  # fmt: skip


def worker(run: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "loco.worker", *COMMON, *args, f"hydra.run.dir={run}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_resume_mid_run_equals_straight_run(tmp_path):
    worker(tmp_path / "straight", "train.steps=30")
    worker(tmp_path / "resumed", "train.steps=30", "checkpoint.every=15")  # writes step 15 and 30
    # roll the second run back to its step-15 checkpoint, then resume to 30
    ck = tmp_path / "resumed" / "checkpoints"
    for p in ck.glob("step_*30*"):
        shutil.rmtree(p)
    (ck / "latest").write_text("step_0000015\n")
    worker(tmp_path / "resumed", "train.steps=30", "checkpoint.every=15", "resume=latest")
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())["final_params_crc32"]
    b = json.loads((tmp_path / "resumed" / "summary.json").read_text())["final_params_crc32"]
    assert a is not None and a == b  # CRC-32 of the exact bytes of the final flat vector
