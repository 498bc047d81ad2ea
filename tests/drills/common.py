"""Helpers of the fault drills: a federation of real ``loco.worker`` processes with faults."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loco.federation import Federation, run_federation
from loco.metrics import read_metrics

TINY = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_every=10", "train.eval_batches=2", "train.log_every=5",
    "train.warmup_steps=2", "train.lr=3e-3",
]  # fmt: skip
SITES3 = ["eu", "us", "asia"]
# 16 rounds of 5 steps; one of three sites sits out each round, so every distance is pairwise
SHORT = ["train.steps=80", "outer.H=5", "gossip.odd=sit_out"]
# failures show up within a second: heartbeats every 0.2 s, dead after 2 misses
# the drills' record counts assume the paper's form (no final average round)
SPEC = ["outer=noloco-spec"]
FAST_FAILURE = ["gossip.heartbeat_s=0.2", "gossip.dead_after=2", "gossip.hello_timeout_s=1.0",
                "gossip.max_retries=2", "gossip.backoff_s=0.05", "gossip.pull_timeout_s=8"]  # fmt: skip


def run_drill(
    tmp: Path, sites: list[str], faults: dict[str, Any] | None, overrides: list[str],
    monkeypatch: pytest.MonkeyPatch, timeout: float = 200,
) -> dict[str, Any]:  # fmt: skip
    """Run a federation of ``sites`` with the ``LOCO_FAULTS`` spec ``faults``; every site must
    exit 0. Returns run_federation's summary."""
    if faults is None:
        monkeypatch.delenv("LOCO_FAULTS", raising=False)
    else:
        monkeypatch.setenv("LOCO_FAULTS", json.dumps(faults))
    ov = [f"federation.sites=[{','.join(sites)}]", *TINY, *SPEC, *FAST_FAILURE, *overrides]
    out = run_federation(ov, tmp, timeout=timeout)
    for r in out["sites"]:
        log = (tmp / r["site"] / "worker.log").read_text()[-3000:]
        assert r["exit"] == 0, f"{r['site']} exited {r['exit']}:\n{log}"
    return out


def outer(tmp: Path, site: str) -> list[dict[str, Any]]:
    return read_metrics(tmp / site / "metrics.jsonl", "outer")


def assert_no_nan_applied(tmp: Path, sites: list[str]) -> None:
    """Every training and validation loss and every final parameter of every site is finite
    (a NaN applied once would propagate into all of them)."""
    for s in sites:
        for kind in ("train", "eval"):
            recs = read_metrics(tmp / s / "metrics.jsonl", kind)
            assert recs, (s, kind)
            bad = [r["step"] for r in recs if r["loss"] is None or not math.isfinite(r["loss"])]
            assert not bad, f"{s}: non-finite {kind} loss at steps {bad}"
        final = load_file(str(tmp / s / "model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in final.values()), (
            f"{s}: non-finite final parameters"
        )


def distances(tmp: Path, site: str) -> dict[int, float | None]:
    """Round -> consensus distance of ``site``'s record (None: nobody pulled that round)."""
    return {r["round"]: r["consensus_distance"] for r in outer(tmp, site)}


def recovered(
    dist: dict[str, dict[int, float | None]], healthy: dict[str, dict[int, float | None]],
    cut: tuple[int, int], within: int, slack: float = 1.5, rejoin: str | None = None,
) -> None:  # fmt: skip
    """The sites re-converge after a fault in rounds ``[cut[0], cut[1])``: every pairwise
    distance recorded from round ``cut[1] + within`` on is (a) at most ``slack`` x the largest
    one the fault-free control run ``healthy`` (same settings and seed: the same pairs) records
    before ``cut[1]``, i.e. back in a healthy run's range, and (b) below the largest one of
    the first ``within`` rounds after the heal by the factor ``slack``, i.e. the gap the fault
    opened has been closing. ``slack`` 1.5: single rounds vary ~2x with the random pairing,
    and the healthy level itself falls with the learning rate, so exact levels differ from
    one CPU's float rounding to another's; a site that does not re-converge fails (b).

    ``rejoin``: the site the fault cut off. Its rounds run on their own clock (alone, it waits
    for nobody), so how many rounds after ``cut[1]`` it pairs again depends on the machine's
    speed; with ``rejoin`` the heal is the first round from ``cut[1]`` on in which it pairs,
    the gap is every distance up to that round, and (a) and (b) hold from ``within`` rounds
    after it."""

    def span(
        d: dict[str, dict[int, float | None]], lo: int, hi: int
    ) -> dict[tuple[str, int], float]:
        return {(s, t): x for s, ds in d.items() for t, x in ds.items()
                if lo <= t < hi and x is not None and x > 0}  # fmt: skip

    end = 1 << 30
    level = max(span(healthy, 0, cut[1]).values(), default=0.0)
    assert level > 0, f"the control run paired nobody before round {cut[1]}: {healthy}"
    heal = cut[1]
    if rejoin is not None:
        back = sorted(t for t, x in dist[rejoin].items() if t >= cut[1] and x is not None and x > 0)
        assert back, f"{rejoin} never paired again after round {cut[1]}: {dist}"
        heal = back[0]
    gap = span(dist, cut[1], heal + 1 if rejoin is not None else heal + within)
    assert gap, f"nobody paired in the {within} rounds after the heal: {dist}"
    post = span(dist, heal + within, end)
    assert post, f"no pairing after round {heal + within}: {dist}"
    peak = max(gap.values())
    bad = {k: d for k, d in post.items() if d > slack * level or d > peak / slack}
    assert not bad, (
        f"still apart after the heal (healthy level {level:.3g}, gap at the heal {peak:.3g}): {bad}"
    )


def assert_report(tmp: Path, sites: list[str]) -> None:
    """``report.md`` and its three PNGs, in the federation dir and in every site's dir."""
    for d in [tmp, *(tmp / s for s in sites)]:
        text = (d / "report.md").read_text()
        for png in ("val_loss.png", "bytes.png", "consensus.png"):
            assert f"({png})" in text, (d, png)
            data = (d / png).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (d, png, len(data))


# ---------------------------------------------------------------- kill, restart, replace a site


def start_federation(
    tmp: Path, sites: list[str], overrides: list[str], monkeypatch: pytest.MonkeyPatch,
    nprocs: list[int] | None = None,
) -> Federation:  # fmt: skip
    """Start (and return, running) a federation of ``sites`` (``nprocs`` ranks each, default
    1) with the drills' settings, as ``loco.local`` does, so that a test can kill and restart
    one of its sites (``Federation.kill``, ``Federation.restart``)."""
    monkeypatch.delenv("LOCO_FAULTS", raising=False)
    ov = [f"federation.sites=[{','.join(sites)}]", *TINY, *SPEC, *FAST_FAILURE, *overrides]
    # mTLS between the sites: start() makes the run CA and one certificate per site
    fed = Federation(tmp, sites, ov, nproc=1, insecure=False, method="noloco", nprocs=nprocs)
    fed.start()
    return fed


def wait_until(what: str, cond: Any, fed: Federation, timeout: float = 120.0) -> Any:
    """Poll ``cond()`` every 20 ms until it is truthy (returned); fail naming ``what`` when a
    site exits with an error (SIGKILL aside: the drill's own) or after ``timeout`` seconds."""
    t0 = time.monotonic()
    while not (got := cond()):
        bad = {n: c for n, c in fed.poll().items() if c not in (None, 0, -9)}
        assert not bad, f"waiting for {what}: site(s) exited {bad}"
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.02)
    return got


def records(path: Path, kind: str) -> list[dict[str, Any]]:
    return read_metrics(path / "metrics.jsonl", kind) if (path / "metrics.jsonl").exists() else []


def last_step(path: Path) -> int:
    """The last inner step a site logged a train record for (0: none yet)."""
    return max((r["step"] for r in records(path, "train")), default=0)


def assert_kept_training(tmp: Path, others: list[str], t0: float, t1: float, H: int,
                         pull_timeout_s: float) -> None:  # fmt: skip
    """While a site was down (wall time ``[t0, t1)``) the ``others`` kept training: each ran
    whole rounds then, and no round of theirs in the whole run waited past the pull deadline."""
    for s in others:
        done = [r["round"] for r in outer(tmp, s) if t0 <= r["time"] < t1]
        assert len(done) >= 2, f"{s} ran {len(done)} rounds while the site was down"
        slow = [(r["round"], round(r["round_seconds"], 2)) for r in outer(tmp, s)
                if r["round_seconds"] > pull_timeout_s + 2.0]  # fmt: skip
        assert not slow, f"{s}: rounds past the pull deadline {pull_timeout_s} s: {slow}"


def split_distances(
    tmp: Path, sites: list[str], t0: float, t1: float
) -> tuple[list[float], dict[tuple[str, int], float]]:
    """Pairwise consensus distances recorded before wall time ``t0`` (the fault) and after
    ``t1`` (the site is back), the latter keyed by (site, round)."""
    pre, post = [], {}
    for s in sites:
        for r in outer(tmp, s):
            d = r["consensus_distance"]
            if d is None:
                continue
            if r["time"] < t0:
                pre.append(d)
            elif r["time"] >= t1:
                post[(s, r["round"])] = d
    return pre, post


def assert_committed(ck: Path) -> dict[str, Any]:
    """``latest`` in the checkpoint dir ``ck`` names the newest committed checkpoint, which
    loads (every entry passes its CRC-32) with finite values; returns its manifest."""
    from loco.checkpoint import latest_checkpoint, load_full, read_manifest
    from loco.checkpoint.format import steps

    latest = latest_checkpoint(ck)
    assert latest is not None, f"no committed checkpoint in {ck}"
    man = read_manifest(latest)
    assert man["step"] == max(steps(ck)), (latest, steps(ck))
    for name, v in load_full(latest, what=tuple(man["streams"])).items():
        assert bool(torch.isfinite(v).all()), f"{latest}: non-finite {name}"
    return man
