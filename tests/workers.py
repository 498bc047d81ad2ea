"""Test helpers: run the real ``loco.worker`` entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loco.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def run_worker(
    args: list[str], run_dir: Path | None = None, timeout: float = 240, **kw
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loco.worker", *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCO_DEBUG", None)
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}
