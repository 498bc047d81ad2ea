"""The peer benchmarks' own logic: bytes accounting, ratios, the configuration each replica group
composes (the peers themselves are not installed here; the scripts run against them by hand)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _args(**kw) -> argparse.Namespace:
    base = dict(steps=200, H=50, sites=4, model="tiny", batch=8, seq_len=64, seed=7, timeout=60)
    return argparse.Namespace(**{**base, **kw})


def test_ring_bytes_is_two_n_minus_one_over_n():
    tf = _load("peers_torchft")
    assert tf.ring_bytes(400, 4) == 600.0  # 2 * 3/4 * 400
    assert tf.ring_bytes(400, 2) == 400.0
    assert tf.ring_bytes(400, 1) == 0.0


def test_ratios_are_loco_over_peer_and_none_when_missing():
    tf = _load("peers_torchft")
    loco = {"val_loss": 2.2, "wall_s": 30.0, "bytes_between_groups": 300}
    peer = {"val_loss": 2.0, "wall_s": 60.0, "bytes_between_groups": 0}
    assert tf.ratios(loco, peer) == {"val_loss": 1.1, "wall_s": 0.5, "bytes": None}


@pytest.mark.parametrize("index", [0, 3])
def test_replica_group_composes_the_site_configuration(index):
    tf = _load("peers_torchft")
    cfg = tf._site_cfg(_args(), index)
    assert cfg.site.name == tf.SITES[index] and cfg.site.shard == index
    assert (cfg.outer.method, cfg.outer.H, cfg.compression.codec) == ("diloco", 50, "none")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len) == (200, 8, 64)
    assert (cfg.train.seed, cfg.data.num_shards, cfg.train.warmup_steps) == (7, 4, 10)


def test_deepspeed_summary_ratios_per_stage():
    ds = _load("peers_deepspeed")
    med = {"loco1": 0.1, "ds1": 0.2, "loco2": 0.3, "ds2": 0.3, "loco3": 0.1, "ds3": 0.4,
           "loco2_offload": 0.3, "ds2_offload": 0.6}  # fmt: skip
    state = {"loco1": 12, "ds1": 10, "loco2": 10, "ds2": 10, "loco3": 8, "ds3": 16,
             "loco2_offload": 10, "ds2_offload": 20}  # fmt: skip
    rows = ds.summarize(med, state)
    assert set(rows) == {"stage1", "stage2", "stage3", "stage2_offload"}
    assert rows["stage2_offload"]["step_loco_over_ds"] == 0.5
    assert rows["stage2_offload"]["state_loco_over_ds"] == 0.5
    assert rows["stage1"]["step_loco_over_ds"] == 0.5
    assert rows["stage1"]["state_loco_over_ds"] == 1.2
    assert rows["stage3"] == {
        "loco_step_ms": 100.0, "ds_step_ms": 400.0, "step_loco_over_ds": 0.25,
        "loco_state_bytes": 8, "ds_state_bytes": 16, "state_loco_over_ds": 0.5,
    }  # fmt: skip


@pytest.mark.parametrize("script", ["peers_torchft.py", "peers_deepspeed.py"])
def test_without_the_peer_one_line_and_exit_2(script):
    try:
        import deepspeed  # noqa: F401
        import torchft  # noqa: F401

        pytest.skip("the peers are installed in this interpreter")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, str(BENCH / script)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'loco[peers]'" in out.stderr.strip().splitlines()[-1]
