"""A Hydra multirun of ``loco.local``: each job a whole federation, one table at the end."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.federation.test_local import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sweep_table_csv_and_plot(tmp_path):
    cmd = [sys.executable, "-m", "loco.local", "-m", "outer.beta=0.5,0.7", "compression=int8",
           "federation.sites=[eu,us]", "train.steps=6", "outer.H=3", "gossip.insecure=true",
           f"hydra.sweep.dir={tmp_path}", *TINY]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"].split()[0] for r in rows] == ["outer.beta=0.5", "outer.beta=0.7"]
    for r in rows:
        assert float(r["val_loss_eu"]) > 0 and float(r["val_loss_us"]) > 0
        assert float(r["val_loss_mean"]) > 0 and float(r["bytes_sent"]) > 0
        assert float(r["wall_s"]) > 0 and float(r["consensus_distance"]) >= 0
        assert not r["failed"]
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("outer.beta=") == 2 and "(sweep.png)" in md
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "sweep:" in p.stdout and "val_loss_mean" in p.stdout
    for job in ("0", "1"):  # every job is a federation with its own report
        assert (tmp_path / job / "report.md").exists()
        assert (tmp_path / job / "eu" / "report.md").exists()
