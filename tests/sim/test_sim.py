"""The simulator: its CLI, the real outer step's invariant, the all-reduce time formulas,
failures seen through SWIM, and per-site membership bytes that do not grow with N."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from loco.sim import SimOptions, parse_args, simulate
from loco.sim.__main__ import main
from loco.sim.links import LinkModel, ring_allreduce_s, tree_allreduce_s
from loco.sim.run import Federation


def test_cli_prints_one_json_line_and_refuses_bad_keys(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "loco.sim", "sites=4", "rounds=3", "dim=8"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["sites"] == 4 and len(rec["consensus"]) == 3
    assert main(["sites=4", "nope=1"]) == 2
    assert main(["sites=0"]) == 2
    assert main(["method=ring"]) == 2
    assert main(["kill=4", "sites=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("loco.sim: ") for line in err)
    assert parse_args(["sites=1e3"]).sites == 1000


def test_mean_of_phi_follows_the_heavy_ball_step_on_the_mean_delta():
    """NoLoCo's gamma terms cancel within each settled group, so (all sites paired) the sites'
    mean phi and mean momentum follow m <- a m + b mean(delta), phi <- phi + m exactly."""
    o = SimOptions(sites=8, rounds=1, dim=16, straggler_p=0.0, pull_timeout_s=1e6)
    fed = Federation(o)
    inner, seen = fed.model.inner, {}

    def recording(*a, **k):  # the deltas of the round, as the federation got them
        seen["d"] = inner(*a, **k)
        return seen["d"]

    fed.model.inner = recording
    m_bar = torch.zeros(o.dim)
    for r in range(4):
        phi_bar = torch.stack([s.phi for s in fed.states]).mean(0)
        rec = fed.round(r)
        assert rec["paired"] == 1.0
        d_bar = torch.stack(list(seen["d"].values())).mean(0)
        m_bar = o.alpha * m_bar + o.beta * d_bar
        got = torch.stack([s.phi for s in fed.states]).mean(0)
        assert torch.allclose(got, phi_bar + m_bar, atol=1e-5), r
        assert torch.allclose(torch.stack([s.momentum for s in fed.states]).mean(0), m_bar,
                              atol=1e-5)  # fmt: skip


def test_allreduce_times_on_uniform_links_match_the_formulas():
    n, nbytes = 16, 4e8
    links = LinkModel(n, rng=np.random.default_rng(0), lat_ms=20, lat_sigma=0.0, bw_gbps=1.0,
                      bw_sigma=0.0)  # fmt: skip
    lat, bw = 0.02, 1e9 / 8  # a link: two 10 ms ends, 125 MB/s
    members = list(range(n))
    assert ring_allreduce_s(links, members, nbytes) == pytest.approx(
        2 * (n - 1) * (lat + nbytes / n / bw)
    )
    assert tree_allreduce_s(links, members, nbytes) == pytest.approx(
        2 * math.log2(n) * (lat + nbytes / bw)
    )


def test_kills_are_seen_by_swim_and_survivors_pair_again():
    rec = simulate(SimOptions(sites=32, rounds=14, dim=8, kill=4, kill_round=3, restart=2,
                              restart_after=6))  # fmt: skip
    assert rec["live_at_end"] == 30
    assert all(math.isfinite(c) for c in rec["consensus"] + rec["objective"])
    # the kill round and the next few lose pairs (partners of the dead wait, views disagree);
    # over the run most site-rounds are paired
    assert rec["paired_fraction"] > 0.75
    assert max(rec["consensus"]) < 4 * rec["consensus"][2]


def test_membership_bytes_per_site_do_not_grow_with_n():
    per = {}
    for n in (8, 128):
        rec = simulate(SimOptions(sites=n, rounds=6, dim=4, straggler_p=0.0, pull_timeout_s=1e6))
        per[n] = rec["bytes_per_site_round"]["membership"]
        assert rec["bytes_per_site_round"]["payload"] == pytest.approx(2 * 1e8 * 4, rel=1e-9)
    # one ping and one ack per period, a few piggybacked updates: O(1); the start-up
    # announcements ride 3 log2(N+1) messages each, so allow the log factor of those
    assert per[128] < 2.0 * per[8], per


def test_diloco_has_no_consensus_distance_and_local_never_pairs():
    d = simulate(SimOptions(sites=8, rounds=4, dim=8, method="diloco"))
    assert max(d["consensus"]) < 1e-6 and d["paired_fraction"] == 1.0
    loc = simulate(SimOptions(sites=8, rounds=4, dim=8, method="local"))
    assert loc["paired_fraction"] == 0.0 and loc["bytes_per_site_round"]["payload"] == 0.0
