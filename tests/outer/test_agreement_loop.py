"""The pairing agreement in real rounds: OuterLoops on real GossipNodes (loopback, threads).

Views that disagree make both sites step alone, and neither pulls from the other; views that
agree give the same groups as the message-free pairing (``loco.gossip.pairing``), with or
without overlap.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch

from loco.gossip import GossipNode
from loco.gossip.pairing import partners as pairing_partners
from loco.outer import build_outer
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.loop import OuterLoop

from .test_fragments import RankFlat
from .test_loop import LAYOUT, RUN, A, B, G, P, inner_steps, make_sites, ports_for, run_parallel

PADDED = 3008  # two ranks' shards of P = 3001, padded as the engine pads


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


def _rank_loop(name, ports, theta, r):
    """Rank ``r`` of a two-rank site (its own OuterLoop and GossipNode, rank r on port + r)."""
    node = GossipNode(
        site=name, rank=r, nproc=2, flat_size=PADDED, run_id=RUN, layout_hash=LAYOUT,
        listen=f"127.0.0.1:{ports[name]}",
        peers={n: f"127.0.0.1:{ports[n]}" for n in ports if n != name},
        insecure=True, heartbeat=False, pull_timeout_s=5.0, hello_timeout_s=1.0, max_retries=1,
    ).start()  # fmt: skip
    flat = RankFlat(theta, PADDED, 2, r)
    pay = RangePayloads(shard=(flat.slo, flat.shi), owned=(flat.lo, flat.hi), codec="int8",
                        delta_options=codec_options("int8", block=256, scale_dtype="fp32",
                                                    stochastic=False, topk_fraction=0.1),
                        flat_size=PADDED)  # fmt: skip
    return OuterLoop(step=build_outer("noloco", alpha=A, beta=B, gamma=G), flat=flat, H=5,
                     steps=10, node=node, payloads=pay, site=name, tau=2, linger_s=2.0)  # fmt: skip


def test_one_rank_failing_its_exchange_steps_alone_with_the_partners_matching_rank():
    """Two sites of two ranks each; eu's rank 1 cannot reach us (its proposal fetch fails:
    ``unavailable``) while rank 0 can. Rank 1 settles alone, so its gate refuses us's rank 1
    (``not_agreed``): that range steps alone on both sites, the other range pairs (n = 2, the
    same mean on both sites), in the overlapped round and the blocking last one alike."""
    ports = {"eu": 0, "us": 0}
    while abs(ports["eu"] - ports["us"]) < 2:  # rank r listens on port + r
        ports = ports_for(["eu", "us"])
    loops = {}
    for name in ("eu", "us"):
        theta = torch.from_numpy(
            np.random.default_rng(zlib.crc32(name.encode())).standard_normal(P).astype(np.float32)
        )
        for r in (0, 1):
            loops[(name, r)] = _rank_loop(name, ports, theta, r)
    loops[("eu", 1)].node._rank0_address = lambda site: None  # the fault: one rank's fetch

    def go(key):  # training: each rank moves its own range of the site's theta
        loop, g = loops[key], torch.Generator().manual_seed(zlib.crc32(key[0].encode()))
        for s in range(1, 11):
            loop.flat.master().add_(
                (0.01 * torch.randn(P, generator=g))[loop.flat.lo : loop.flat.hi]
            )
            loop.on_step_end(s)
        loop.finish()

    try:
        run_parallel([lambda k=k: go(k) for k in loops])
        hist = {k: loop.history for k, loop in loops.items()}
        for t in (0, 1):
            eu0, us0, eu1, us1 = (hist[k][t] for k in (("eu", 0), ("us", 0), ("eu", 1), ("us", 1)))
            assert eu0["n"] == us0["n"] == 2 and eu0["dropped"] == us0["dropped"] == "", (eu0, us0)
            assert eu0["mean_crc"] == us0["mean_crc"]
            assert eu1["n"] == 1 and eu1["dropped"] == "us:unavailable", eu1
            assert us1["n"] == 1 and us1["dropped"] == "eu:not_agreed", us1
        served = loops[("eu", 1)].node.metrics.snapshot()
        assert served.get("served_pulls", 0) == 0 and served["served_fail_not_agreed"] >= 2
    finally:
        _close(loops)
