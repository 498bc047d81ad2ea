"""TensorBoard events: every metrics record's numeric figures, readable by TensorBoard itself."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loco.events import EventSink, scalars
from loco.federation import run_federation
from loco.metrics import MetricsWriter, read_metrics
from tests.workers import run_worker

TINY = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_batches=2", "train.progress=false",
]  # fmt: skip


def events_of(directory: Path) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return acc


def test_worker_events_match_its_metrics(tmp_path):
    run = [*TINY, "+site=eu", "train.steps=6", "train.log_every=2", "train.eval_every=3",
           "outer.H=3", "checkpoint.every=3"]  # fmt: skip
    p = run_worker(run, tmp_path)
    assert p.returncode == 0, p.stderr
    acc = events_of(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])

    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    got = acc.Scalars("train/loss")
    assert [e.step for e in got] == [r["step"] for r in train] == [2, 4, 6]
    for e, r in zip(got, train, strict=True):
        assert e.value == np.float32(r["loss"]), (e, r)
        assert e.wall_time == pytest.approx(r["time"])
    for name in ("lr", "grad_norm", "tokens_per_s", "tokens"):
        assert f"train/{name}" in tags, name

    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert [e.step for e in acc.Scalars("eval/bpb")] == [r["step"] for r in evals] == [3, 6]
    assert [e.value for e in acc.Scalars("eval/bpb")] == [np.float32(r["bpb"]) for r in evals]

    outer = read_metrics(tmp_path / "metrics.jsonl", "outer")
    assert [e.step for e in acc.Scalars("outer/bytes_sent")] == [r["step"] for r in outer]
    assert {"outer/compute_utilization", "outer/round_seconds", "outer/n"} <= tags
    # an alone site: no distance (null), a text partner list and a checksum are no scalars
    assert all(r["consensus_distance"] is None for r in outer)
    assert not tags & {"outer/consensus_distance", "outer/partner", "outer/mean_crc"}
    ckpt = read_metrics(tmp_path / "metrics.jsonl", "ckpt")
    assert len(acc.Scalars("ckpt/stall_seconds")) == len(ckpt) == 2


def test_tensorboard_off_writes_no_event_file(tmp_path):
    p = run_worker([*TINY, "+site=eu", "train.steps=2", "train.tensorboard=false"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert read_metrics(tmp_path / "metrics.jsonl", "train")
    assert not (tmp_path / "tensorboard").exists()
    assert not list(tmp_path.rglob("*tfevents*"))


def test_only_finite_real_figures_are_scalars():
    figs = dict(loss=2.5, tokens=128, nan=math.nan, inf=-math.inf, ok=True, text="eu:bad",
                none=None, mean_crc=123456789, np64=np.float64(0.25))  # fmt: skip
    assert scalars(figs) == {"loss": 2.5, "tokens": 128.0, "np64": 0.25}


def test_a_failing_sink_warns_once_and_the_metrics_go_on(tmp_path):
    blocker = tmp_path / "tensorboard"
    blocker.write_text("a file where the event directory should be")
    m = MetricsWriter(tmp_path / "metrics.jsonl", site="eu", rank=0, events=blocker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            m.log("train", step=step, round=0, loss=1.0 / step)
        m.close()
    assert len(caught) == 1 and "TensorBoard events" in str(caught[0].message)
    assert m.events is not None and not m.events.enabled
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_an_error_mid_run_turns_the_sink_off(tmp_path):
    sink = EventSink(tmp_path / "tb")
    assert sink.write("train", 1, {"loss": 3.0}) == 1

    def broken(*args, **kwargs):
        raise OSError("disk full")

    sink._writer.add_scalar = broken
    with pytest.warns(RuntimeWarning, match="disk full"):
        assert sink.write("train", 2, {"loss": 2.0}) == 0
    assert not sink.enabled and sink.write("train", 3, {"loss": 1.0}) == 0
    sink.close()
    assert [e.step for e in events_of(tmp_path / "tb").Scalars("train/loss")] == [1]


def test_federation_sites_write_events_side_by_side(tmp_path):
    sites = ["eu", "us"]
    out = run_federation(
        ["federation.sites=[eu,us]", "train.steps=4", "outer.H=2", "train.log_every=2",
         "train.eval_every=4", "gossip.insecure=true", *TINY],
        tmp_path,
        timeout=120,
    )  # fmt: skip
    assert [r["exit"] for r in out["sites"]] == [0, 0], out
    for site in sites:
        acc = events_of(tmp_path / site / "tensorboard")
        sent = acc.Scalars("outer/bytes_sent")
        # two rounds, then the default form's final average (one more outer record at step 4)
        assert [e.step for e in sent] == [2, 4, 4], site
        # they did talk to each other: every record pulled from the partner. What a site
        # served is counted when the partner pulls it, which may fall after this site's record
        # (a landing leader's phi, the final average): only the run's sum must be above zero
        recv = acc.Scalars("outer/bytes_recv")
        assert all(e.value > 0 for e in recv), site
        assert sum(e.value for e in sent) > 0, site
        assert "outer/consensus_distance" in acc.Tags()["scalars"], site
        assert [e.step for e in acc.Scalars("train/loss")] == [2, 4], site
