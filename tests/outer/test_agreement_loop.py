"""The pairing agreement in real rounds: OuterLoops on real GossipNodes (loopback, threads).

Views that disagree make both sites step alone, and neither pulls from the other; views that
agree give the same groups as the message-free pairing (``loco.gossip.pairing``), with or
without overlap.
"""

from __future__ import annotations

import time

import torch

from loco.gossip.pairing import partners as pairing_partners

from .test_loop import B, inner_steps, make_sites, ports_for, run_parallel


def _pulls(loop) -> tuple[float, float]:
    """(pulls this site made, pulls its server served)."""
    m = loop.node.metrics.snapshot()
    return m.get("pulls_ok", 0) + m.get("pulls_failed", 0), m.get("served_pulls", 0)


def _close(sites) -> None:
    for s in sites.values():
        s.close()


def test_disagreeing_views_step_alone_and_never_pull_each_other():
    """eu sees a third site (as) that us does not know: eu proposes the triple, us the pair;
    in both rounds both sites take the local step and no payload travels between them."""
    sites = make_sites(["eu", "us"], ports_for(["eu", "us"]), codec="none", tau=0)
    eu, us = sites["eu"], sites["us"]
    eu.node.live_sites = lambda: ["as", "eu", "us"]  # the fault: a view only eu holds
    try:
        phi0 = {n: s.state.phi.clone() for n, s in sites.items()}
        phi1 = {}

        def run(s, i):
            inner_steps(s, 0, 5, i)
            phi1[s.site] = (s.state.phi.clone(), s.last_means[0].clone())
            inner_steps(s, 5, 5, 10 + i)

        run_parallel([lambda s=s, i=i: run(s, i) for i, s in enumerate(sites.values())])
        for rec in eu.history:
            assert rec["n"] == 1 and rec["partner"] == "as,us", rec
            assert rec["dropped"] == "as:unavailable,us:not_agreed", rec
        for rec in us.history:
            assert rec["n"] == 1 and rec["partner"] == "eu" and rec["dropped"] == "eu:not_agreed"
        assert _pulls(eu) == (0, 0) and _pulls(us) == (0, 0)
        for n in sites:  # the local step on its own delta: phi0 + beta * delta
            phi, delta = phi1[n]
            torch.testing.assert_close(phi, phi0[n] + B * delta, rtol=0, atol=1e-6)
        assert eu.node.metrics.snapshot()["agree_alone"] == 2
    finally:
        _close(sites)


def test_four_sites_pair_as_the_message_free_pairing():
    """With agreeing views every round's groups are those of pairing(seed, t, live): n = 2 on
    every site, and both members of a pair compute bit-identical means."""
    names = ["as", "eu", "sa", "us"]
    sites = make_sites(names, ports_for(names), codec="int8", seed=7)
    try:
        run_parallel(
            [lambda s=s, i=i: inner_steps(s, 0, 15, i) for i, s in enumerate(sites.values())]
        )
        for t in (1, 2, 3):
            crc = {}
            for n, s in sites.items():
                rec = s.history[t - 1]
                assert rec["round"] == t and rec["n"] == 2 and rec["dropped"] == "", rec
                assert rec["partner"] == ",".join(pairing_partners(7, t, names, n)), rec
                crc[n] = rec["mean_crc"]
            for n in names:
                (p,) = pairing_partners(7, t, names, n)
                assert crc[n] == crc[p]
        agree_bytes = sum(s.node.metrics.snapshot()["agree_bytes"] for s in sites.values())
        # one request and one answer per site and round, each < 60 bytes
        assert 0 < agree_bytes < 4 * 3 * 2 * 60
    finally:
        _close(sites)


def test_overlap_rounds_agree_and_merge_later():
    """tau = 2: the exchange happens at the boundary, the pulls in the background."""
    sites = make_sites(["eu", "us"], ports_for(["eu", "us"]), codec="int8", tau=2)
    try:
        run_parallel(
            [lambda s=s, i=i: inner_steps(s, 0, 12, i) for i, s in enumerate(sites.values())]
        )
        eu, us = sites["eu"], sites["us"]
        assert [r["step"] for r in eu.history] == [5, 10]
        for a, b in zip(eu.history, us.history, strict=True):
            assert a["n"] == b["n"] == 2 and a["mean_crc"] == b["mean_crc"]
    finally:
        _close(sites)


def test_overlap_rounds_with_disagreeing_views_step_alone():
    sites = make_sites(["eu", "us"], ports_for(["eu", "us"]), codec="int8", tau=2)
    sites["us"].node.live_sites = lambda: ["eu", "us", "zz"]  # a view only us holds
    try:
        run_parallel(
            [lambda s=s, i=i: inner_steps(s, 0, 7, i) for i, s in enumerate(sites.values())]
        )
        for s in sites.values():
            assert s.history[0]["n"] == 1 and "not_agreed" in s.history[0]["dropped"]
            assert _pulls(s) == (0, 0)
    finally:
        _close(sites)


LATE_S = 1.0  # how much later the partner reaches the boundary
MAX_BOUNDARY_S = 0.2  # the boundary's own work: encode + publish ~2 KB, a proposal; no message


def test_overlap_boundary_does_not_wait_for_a_late_partner():
    """tau = 3: eu reaches round 1's boundary LATE_S before us. The agreement runs with the
    pulls in the background, so eu's boundary takes < MAX_BOUNDARY_S (it used to wait for us's
    proposal: >= LATE_S), and the round still pairs (n = 2, the same mean on both sites)."""
    sites = make_sites(["eu", "us"], ports_for(["eu", "us"]), codec="int8", tau=3, H=5, steps=10)
    eu, us = sites["eu"], sites["us"]
    took = {}

    def run_eu():
        g = torch.Generator().manual_seed(0)
        for s in range(1, 11):
            eu.flat.theta.add_(0.01 * torch.randn(eu.flat.theta.numel(), generator=g))
            t0 = time.perf_counter()
            eu.on_step_end(s)
            took[s] = time.perf_counter() - t0

    def run_us():
        time.sleep(LATE_S)
        inner_steps(us, 0, 10, 1)

    try:
        run_parallel([run_eu, run_us])
        assert took[5] < MAX_BOUNDARY_S, took
        # the merge three steps later waits for the rest: us's boundary, then the pulls
        assert took[8] > LATE_S - 2 * MAX_BOUNDARY_S, took
        for a, b in zip(eu.history, us.history, strict=True):
            assert a["n"] == b["n"] == 2 and a["dropped"] == b["dropped"] == "", (a, b)
            assert a["mean_crc"] == b["mean_crc"]
        assert [r["step"] for r in eu.history] == [5, 10]
    finally:
        _close(sites)
