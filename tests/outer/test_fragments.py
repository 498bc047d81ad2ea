"""Streaming fragments (``outer.fragments``): the timetable, F = 1 as before bit for bit, and
F = 4 on loopback sites (real GossipNodes and codecs): every fragment synced every H steps with
about 1/F of a round's bytes, partners agreeing per sync, sites with different rank counts,
DiLoCo and the final average, and checkpoints taken while fragments are in flight."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loco.config import ConfigError, compose
from loco.gossip import GossipNode
from loco.gossip.pairing import partners as pairing_partners
from loco.outer import build_outer
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.fragments import fragment_bounds, piece
from loco.outer.loop import OuterLoop
from loco.outer.schedule import Schedule
from loco.summary import outer_summary, utilization
from tests.outer.test_loop import (
    LAYOUT,
    RUN,
    FakeFlat,
    P,
    _int8_closing,
    make_sites,
    ports_for,
    published_streams,
    run_parallel,
)

H = 8
F = 4
CFG = SimpleNamespace(outer=SimpleNamespace(method="diloco"),
                      compression=SimpleNamespace(codec="none"))  # fmt: skip


# ------------------------------------------------------------------ the timetable


def test_schedule_syncs_each_fragment_every_H_steps_at_its_offset():
    s = Schedule(H=50, steps=200, tau=4, fragments=5)
    assert s.stride == 10
    syncs = {d: s.round_at(d) for d in range(1, 201) if s.round_at(d) is not None}
    assert sorted(syncs) == list(range(10, 201, 10))
    by_fragment: dict[int, list[int]] = {}
    for d, j in syncs.items():
        assert j == d // 10  # the gossip round id: unique, growing with the step
        by_fragment.setdefault(s.fragment_of(j), []).append(d)
        t = s.round_of(j)
        assert (t - 1) * 50 < d <= t * 50  # a round's fragments sync inside it
    # fragment f at (t - 1) * H + (f + 1) * H / F: every H steps; the last one at t * H
    assert by_fragment == {f: list(range(10 * (f + 1), 201, 50)) for f in range(5)}
    assert s.round_of(5) == 1 and s.fragment_of(5) == 4 and s.round_of(6) == 2
    assert s.merge_due(10, 14) and not s.merge_due(10, 13)
    assert s.merge_due(198, 200)  # the last step always merges
    assert s.overlaps(190) and not s.overlaps(200)
    assert s.final_round(200) == 21  # after the last sync id (20), never a sync's


def test_schedule_tails_are_the_fragments_not_synced_at_the_step():
    s = Schedule(H=50, steps=200, tau=4, fragments=5)
    assert s.tails(200) == [0, 1, 2, 3]  # fragment 4 synced at 200
    assert s.tails(205) == [0, 1, 2, 3, 4]  # a step after a round's last sync: all of them
    assert s.tails(230) == [0, 1, 3, 4]  # fragment 2 synced at 230 (200 + 3 * 10)
    assert s.tails(3) == [0, 1, 2, 3, 4]  # before any sync
    assert Schedule(H=50, steps=205).tails(205) == [0]  # no fragments: the partial last round
    assert Schedule(H=50, steps=200).tails(200) == []  # a round's boundary: no tail


def test_schedule_without_fragments_is_the_round_timetable():
    s = Schedule(H=50, steps=200, tau=25)
    assert [d for d in range(1, 201) if s.round_at(d) is not None] == [50, 100, 150, 200]
    assert s.round_at(100) == 2 and s.round_of(2) == 2 and s.fragment_of(2) == 0
    assert s.merge_due(50, 75) and not s.merge_due(50, 74)
    assert s.final_round(200) == 5


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(fragments=3), "must divide outer.H=50"),
        (dict(fragments=0), "outer.fragments=0"),
        (dict(fragments=5, tau=10), "outer.fragment_tau=10 must be in [0, outer.H / outer"),
        (dict(tau=50), "outer.tau=50 must be in [0, outer.H)"),
    ],
)
def test_schedule_rejects(kw, words):
    with pytest.raises(ValueError, match=r".*".join(map(_re, words.split()))):
        Schedule(H=50, steps=200, **kw)


def _re(s: str) -> str:
    import re

    return re.escape(s)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["outer.fragments=3"], ["outer.fragments=3", "outer.H=50"]),
        (["outer.fragments=0"], ["outer.fragments=0", "> 0"]),
        (["outer.fragments=5", "outer.fragment_tau=10"], ["outer.fragment_tau=10", "[0, 10)"]),
        (["outer.fragments=5", "outer.fragment_tau=-1"], ["outer.fragment_tau=-1"]),
        (["outer.fragments=5", "outer.tau=5"], ["outer.tau=5", "outer.fragment_tau"]),
        (["outer.merge=blend"], ["outer.merge='blend'", "mix, carry"]),
    ],
)
def test_config_rejects_with_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        compose(["+site=eu", *overrides])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_config_accepts_fragments():
    cfg = compose(["+site=eu", "outer.fragments=5", "outer.fragment_tau=3", "outer.merge=mix"])
    assert (cfg.outer.fragments, cfg.outer.fragment_tau, cfg.outer.merge) == (5, 3, "mix")
    cfg = compose(["+site=eu"])
    assert (cfg.outer.fragments, cfg.outer.fragment_tau, cfg.outer.merge) == (1, None, "carry")


def test_fragments_tile_the_flat_space_and_ranges_cut_them():
    bounds = [fragment_bounds(P, 4, f) for f in range(4)]
    assert bounds[0][0] == 0 and bounds[-1][1] == P
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert {hi - lo for lo, hi in bounds} <= {P // 4, P // 4 + 1}
    # two ranks of [0, 1504) and [1504, 3001): fragment 2 straddles them, 3 is rank 1's only
    assert piece(P, 4, 2, 0, 1504) == (1500, 1504) and piece(P, 4, 2, 1504, P) == (1504, 2250)
    a, b = piece(P, 4, 3, 0, 1504)
    assert a == b  # empty


# ------------------------------------------------------------------ loopback sites


def _options(codec: str) -> dict:
    return codec_options(codec, block=256, scale_dtype="fp32", stochastic=False,
                         topk_fraction=0.1)  # fmt: skip


def _payloads_for(codec: str, phi_codec: str = "none"):
    def make(span: tuple[int, int]) -> RangePayloads:
        return RangePayloads(shard=span, owned=span, codec=codec, phi_codec=phi_codec,
                             delta_options=_options(codec), phi_options=_options(phi_codec))  # fmt: skip

    return make


def frag_sites(names, *, fragments=F, fragment_tau=1, codec="int8", method="noloco", steps=32,
               odd="triple", final_average=False, tau=0, outer_kw=None, merge="carry",
               loop_kw=None):  # fmt: skip
    """``make_sites``' loopback sites (one rank each), rebuilt as loops with ``fragments``."""
    ports = ports_for(names)
    base = make_sites(names, ports, codec=codec, method=method, H=H, steps=steps,
                      outer_kw=outer_kw)  # fmt: skip
    sites = {}
    for name, lp in base.items():
        lp.node.odd = odd
        # gossip.keep_rounds counts rounds: build._gossip_node keeps F times as many sync ids
        lp.node.server.mailbox.keep_rounds = 2 * fragments
        sites[name] = OuterLoop(
            step=lp.method, flat=lp.flat, H=H, steps=steps, node=lp.node, payloads=lp.payloads,
            site=name, all_live=lp.all_live, linger_s=2.0, tau=tau, fragments=fragments,
            fragment_tau=fragment_tau, payloads_for=_payloads_for(codec),
            final_average=final_average, merge=merge, **(loop_kw or {}),
        )  # fmt: skip
    return sites


def _run(sites, steps, seeds=None):
    """Inner steps 1..steps on every site (noise of its own seed), then ``finish``."""

    def go(loop, seed):
        g = torch.Generator().manual_seed(seed)
        for s in range(1, steps + 1):
            loop.flat.theta.add_(0.01 * torch.randn(P, generator=g))
            loop.on_step_end(s)
        loop.finish()

    seeds = seeds or {n: i for i, n in enumerate(sites)}
    run_parallel([lambda s=s, n=n: go(s, seeds[n]) for n, s in sites.items()])


def _close(sites):
    for s in sites.values():
        s.close()


def _rms_gap(sites) -> float:
    phis = [s.state.phi.double() for s in sites.values()]
    mean = torch.stack(phis).mean(0)
    return float(torch.stack([(p - mean).pow(2).mean() for p in phis]).mean().sqrt())


def test_one_fragment_is_the_round_path_bit_for_bit():
    """fragments=1 (with the fragment options given) against the loop built without them."""
    names = ["eu", "us"]
    old = make_sites(names, ports_for(names), codec="int8", H=H, steps=24, tau=3)
    new = frag_sites(names, fragments=1, fragment_tau=None, steps=24, tau=3)
    try:
        _run(old, 24)
        _run(new, 24)
        for n in names:
            assert torch.equal(old[n].flat.theta, new[n].flat.theta)
            assert torch.equal(old[n].state.phi, new[n].state.phi)
            assert torch.equal(old[n].state.momentum, new[n].state.momentum)
            assert torch.equal(old[n].payloads.ef.residual, new[n].payloads.ef.residual)
            crcs = [[h["mean_crc"] for h in x[n].history] for x in (old, new)]
            assert crcs[0] == crcs[1]
            assert all("fragment" not in h for h in new[n].history)
            assert new[n].state.rounds == old[n].state.rounds == 3
    finally:
        _close(old)
        _close(new)


def _check_syncs(sites, steps):
    """Every fragment synced every H steps, partners symmetric and agreeing (mean_crc) per sync,
    the pairing that of the sync id; finite state."""
    for name, s in sites.items():
        assert len(s.history) == steps // (H // F)
        for f in range(F):
            at = [h["step"] for h in s.history if h["fragment"] == f]
            assert at == list(range((f + 1) * (H // F), steps + 1, H)), (name, f, at)
        for j, h in enumerate(s.history, start=1):
            assert h["round"] == (j + F - 1) // F and not h["dropped"], h
            want = pairing_partners(0, j, sorted(sites), name, s.node.odd)
            assert h["partner"] == ",".join(want), (j, h)
            for p in want:
                other = sites[p].history[j - 1]
                assert name in other["partner"].split(",")
                assert other["mean_crc"] == h["mean_crc"]
        assert torch.isfinite(s.state.phi).all() and torch.isfinite(s.flat.theta).all()
        assert s.state.rounds == steps // H and s.settled()


@pytest.mark.parametrize("names,odd", [(["eu", "us"], "triple"), (["asia", "eu", "us"], "sit_out")])
def test_four_fragments_sync_evenly_and_partners_agree(names, odd):
    steps = 32
    whole = make_sites(names, ports_for(names), codec="int8", H=H, steps=steps)
    sites = frag_sites(names, steps=steps, odd=odd)
    for lp in whole.values():
        lp.node.odd = odd
    try:
        _run(whole, steps)
        _run(sites, steps)
        _check_syncs(sites, steps)
        # one sync receives about 1/F of a round's bytes (int8 delta + fp32 phi)
        got = [h["bytes_recv"] for s in sites.values() for h in s.history if h["n"] > 1]
        full = [h["bytes_recv"] for s in whole.values() for h in s.history if h["n"] > 1]
        ratio = np.mean(got) / np.mean(full)
        assert 0.8 / F < ratio < 1.2 / F, ratio
        # the sites stay as close as with whole rounds (closer with three: more pairings mix)
        d_frag, d_whole = _rms_gap(sites), _rms_gap(whole)
        assert 0 < d_frag < 1.5 * d_whole, (d_frag, d_whole)
    finally:
        _close(whole)
        _close(sites)


def test_carry_merge_lands_a_fragments_sync_on_its_piece_alone():
    """``merge="carry"``: one step after fragment 0's sync (``fragment_tau=1``) its piece of
    the weights is the new phi plus the step trained meanwhile; the other pieces are the
    weights as trained, untouched."""
    sites = frag_sites(["eu", "us"], codec="none", steps=H)
    eu = sites["eu"]
    seen = {}
    at = H // F  # fragment 0's sync

    def go(loop, seed):
        g = torch.Generator().manual_seed(seed)
        for s in range(1, at + 2):
            loop.flat.theta.add_(0.01 * torch.randn(P, generator=g))
            if loop is eu and s in (at, at + 1):
                seen[s] = loop.flat.theta.clone()
            loop.on_step_end(s)

    try:
        run_parallel([lambda s=s, i=i: go(s, i) for i, s in enumerate(sites.values())])
        assert eu.pending is None and eu.history[0]["fragment"] == 0 and eu.history[0]["n"] == 2
        a, b = fragment_bounds(P, F, 0)
        want = eu.state.phi[a:b] + seen[at + 1][a:b] - seen[at][a:b]
        torch.testing.assert_close(eu.flat.theta[a:b], want, rtol=0, atol=1e-6)
        assert torch.equal(eu.flat.theta[b:], seen[at + 1][b:])
    finally:
        _close(sites)


def test_stepped_fragments_end_a_pair_on_one_phi_without_deltas():
    """``outer.consensus=stepped`` with four fragments: every sync lands the pair's stepped
    points of its fragment on one point (exact phi, gamma 1), so once every fragment synced the
    two sites hold one phi; no fragment publishes a delta."""
    kw = {"alpha": 0.8, "gamma": 1.0, "consensus": "stepped", "nesterov": True}
    sites = frag_sites(["eu", "us"], codec="none", steps=32, outer_kw=kw)
    streams = published_streams(sites)
    try:
        _run(sites, 32)
        _check_syncs(sites, 32)
        eu, us = sites["eu"].state, sites["us"].state
        assert float((eu.phi - us.phi).abs().max()) < 1e-5
        assert float((eu.momentum - us.momentum).abs().max()) > 1e-3  # each its own deltas
        assert "phi" in streams and "delta" not in streams
    finally:
        _close(sites)


def test_diloco_fragments_keep_one_phi_and_end_on_one_model():
    """DiLoCo with fragments: one phi after every sync; at the last step (fragment 3's sync at
    16) fragments 0-2 sync their progress since their last syncs (ids 9, 10, 11: round 3), so
    the sites end on one model, as with whole rounds: the mean of their weights, no outer step
    (the momentum as it was)."""
    names = ["asia", "eu", "us"]
    sites = frag_sites(names, method="diloco", codec="none", steps=16)
    before = {}
    for name, s in sites.items():  # DiLoCo's sites start from one phi
        s.flat.theta.copy_(sites["eu"].flat.theta)
        s.state.phi.copy_(sites["eu"].flat.theta)
        close = s._close_tails

        def spy(done, s=s, name=name, close=close):
            before[name] = s.flat.theta.clone(), s.state.momentum.clone()
            close(done)

        s._close_tails = spy
    try:
        _run(sites, 16)
        mean = torch.stack([theta for theta, _ in before.values()]).mean(0)
        a, _ = fragment_bounds(P, F, F - 1)
        assert float((before["eu"][0][:a] - before["us"][0][:a]).abs().max()) > 1e-3  # tails
        for name, s in sites.items():
            torch.testing.assert_close(s.flat.theta, mean, rtol=0, atol=1e-6)
            assert torch.equal(s.state.momentum, before[name][1])
        for s in sites.values():
            assert [h["n"] for h in s.history] == [3] * 11
            closing = [(h["step"], h["round"], h["fragment"]) for h in s.history[8:]]
            assert closing == [(16, 3, 0), (16, 3, 1), (16, 3, 2)]
            assert [bool(h.get("closing")) for h in s.history] == [False] * 8 + [True] * 3
            summary = outer_summary(CFG, s, 16)
            assert summary["rounds"] == 2  # the closing syncs are no round
            assert all(h["window_seconds"] > 0 for h in s.history)
            assert summary["compute_utilization"] == pytest.approx(utilization(s.history))
            assert torch.allclose(s.state.phi, sites["eu"].state.phi, rtol=0, atol=1e-6)
            assert torch.allclose(s.flat.theta, sites["eu"].flat.theta, rtol=0, atol=1e-6)
            assert torch.equal(s.flat.theta, s.state.phi)
            assert s.state.momentum.abs().sum() > 0 and s.state.rounds == 2
    finally:
        _close(sites)


def test_diloco_fragments_close_in_their_own_codec_with_the_residual():
    """Ternary syncs, int8 closing (``compression.closing_codec``): the tails of fragments 0-2
    travel in int8 with each site's unsent residual, so every site ends within int8's error of
    the mean of ``theta + residual``; the closing leaves the rounds' count as it was."""
    names = ["asia", "eu", "us"]
    sites = frag_sites(names, method="diloco", codec="ternary", steps=16,
                       loop_kw={"closing_for": _int8_closing()})  # fmt: skip
    seen = {}
    for s in sites.values():
        s.flat.theta.copy_(sites["eu"].flat.theta)
        s.state.phi.copy_(sites["eu"].flat.theta)
        close = s._close_tails

        def spy(done, s=s, close=close):
            seen[s.site] = (s.flat.theta + s.payloads.ef.residual[:P]), s.state.phi.clone()
            close(done)

        s._close_tails = spy
    try:
        _run(sites, 16)
        sent = torch.stack([seen[n][0] for n in sorted(names)])
        want = sent.mean(0)
        a, _ = fragment_bounds(P, F, F - 1)  # fragments 0-2 closed; 3 synced at 16 (ternary)
        atol = 2 * float((sent - seen["eu"][1]).abs().max()) / 127
        for s in sites.values():
            assert float((s.flat.theta[:a] - want[:a]).abs().max()) <= atol
            assert [bool(h.get("closing")) for h in s.history] == [False] * 8 + [True] * 3
            assert s.state.rounds == 2
        assert torch.equal(sites["eu"].flat.theta, sites["us"].flat.theta)
    finally:
        _close(sites)


def test_final_average_with_fragments_ends_on_one_model():
    names = ["eu", "us"]
    sites = frag_sites(names, steps=13, final_average=True)  # the last sync at 12, then 13
    try:
        _run(sites, 13)
        assert torch.equal(sites["eu"].flat.theta, sites["us"].flat.theta)
        for s in sites.values():
            assert s.final["n"] == 2 and len(s.history) == 6
    finally:
        _close(sites)


def test_utilization_weights_each_record_by_its_window():
    """The closing syncs are windows of a few hundredths of a second at ~0 utilization: they
    count for their time, not as whole windows (a plain mean would say 0.45 here)."""
    hist = [{"compute_utilization": 0.9, "window_seconds": 10.0},
            {"compute_utilization": 0.0, "window_seconds": 0.05}]  # fmt: skip
    assert utilization(hist) == pytest.approx(9.0 / 10.05)
    old = [{"compute_utilization": 0.9}, {"compute_utilization": 0.0}]  # records before windows
    assert utilization(old) == pytest.approx(0.45) and utilization([]) == 1.0


def test_noloco_fragments_average_their_tails_as_trained():
    """NoLoCo keeps its tails (the progress since each fragment's last sync) as trained: the
    final weights are the sites' mean of the weights at the last step, no sync and no step
    after fragment 3's at 32 (a closing step of each tail alone did not pay on the link bench,
    docs/outer.md)."""
    kw = {"alpha": 0.8, "gamma": 1.0, "consensus": "stepped", "nesterov": True}
    steps = 32  # fragment 3 syncs at 32; fragments 0, 1, 2 last at 26, 28, 30
    sites = frag_sites(["eu", "us"], codec="none", steps=steps, outer_kw=kw, final_average=True)
    before = {}
    for name, loop in sites.items():
        run = loop._averager.run

        def spy(done, t, loop=loop, name=name, run=run):
            before[name] = loop.flat.theta.clone(), loop.state.phi.clone()
            return run(done, t)

        loop._averager.run = spy
    try:
        _run(sites, steps)
        a, _ = fragment_bounds(P, F, F - 1)
        for theta, phi in before.values():
            assert float((theta[:a] - phi[:a]).abs().min()) > 0  # tails on fragments 0-2
            assert torch.equal(theta[a:], phi[a:])  # fragment 3 synced at the last step
        want = torch.stack([theta for theta, _ in before.values()]).mean(0)
        for loop in sites.values():
            assert loop.final["n"] == 2 and len(loop.history) == steps // (H // F)
            torch.testing.assert_close(loop.flat.theta, want, rtol=0, atol=1e-6)
    finally:
        _close(sites)


# ------------------------------------------------------------------ a site of two ranks


class RankFlat(FakeFlat):
    """Rank ``r`` of a site of ``nproc`` ranks: a window of the site's whole theta."""

    def __init__(self, site_theta: torch.Tensor, padded: int, nproc: int, r: int) -> None:
        super().__init__(site_theta)
        self.slo, self.shi = r * padded // nproc, (r + 1) * padded // nproc
        self.lo, self.hi = min(self.slo, P), min(self.shi, P)
        self.numel, self.padded = P, padded

    def master(self) -> torch.Tensor:
        return self.theta[self.lo : self.hi]


def _rank_loop(name, ports, theta, nproc, r, padded, steps):
    node = GossipNode(
        site=name, rank=r, nproc=nproc, flat_size=padded, run_id=RUN, layout_hash=LAYOUT,
        listen=f"127.0.0.1:{ports[name]}",
        peers={n: f"127.0.0.1:{ports[n]}" for n in ports if n != name},
        insecure=True, heartbeat=False, pull_timeout_s=5.0, hello_timeout_s=1.0, max_retries=1,
        keep_rounds=2 * F,  # as build._gossip_node: gossip.keep_rounds x fragments
    ).start()  # fmt: skip
    flat = RankFlat(theta, padded, nproc, r)
    pay = RangePayloads(shard=(flat.slo, flat.shi), owned=(flat.lo, flat.hi), codec="int8",
                        delta_options=_options("int8"), flat_size=padded)  # fmt: skip
    step = build_outer("noloco", alpha=0.5, beta=0.7, gamma=1.0, consensus="weights")
    return OuterLoop(step=step, flat=flat, H=H, steps=steps, node=node, payloads=pay, site=name,
                     linger_s=2.0, fragments=F, fragment_tau=1,
                     payloads_for=_payloads_for("int8"))  # fmt: skip


def test_two_ranks_against_one_cut_fragments_differently():
    """eu has two ranks ([0, 1504) and [1504, 3001): fragment 2 straddles them, rank 0 has no
    piece of fragment 3, rank 1 none of 0 and 1); us has one. With the ``weights`` form and
    gamma = 1 both sites meet at their mean phi every sync, so their phis agree at the end."""
    steps = 16
    ports = {"eu": 0, "us": 0}
    while ports["eu"] in (0, ports["us"] - 1, ports["us"]):  # eu's ranks listen on base and base+1
        ports = ports_for(["eu", "us"])
    rng = np.random.default_rng(zlib.crc32(b"start"))
    start = torch.from_numpy(rng.standard_normal(P).astype(np.float32))
    th_eu, th_us = start.clone(), start.clone()
    loops = {("eu", r): _rank_loop("eu", ports, th_eu, 2, r, 3008, steps) for r in (0, 1)}
    loops[("us", 0)] = _rank_loop("us", ports, th_us, 1, 0, 3001, steps)
    gen = {"eu": torch.Generator().manual_seed(1), "us": torch.Generator().manual_seed(2)}
    noise = {n: [0.01 * torch.randn(P, generator=g) for _ in range(steps)] for n, g in gen.items()}

    def go(key):
        loop = loops[key]
        for s in range(1, steps + 1):
            loop.flat.master().add_(noise[key[0]][s - 1][loop.flat.lo : loop.flat.hi])
            loop.on_step_end(s)
        loop.finish()

    try:
        run_parallel([lambda k=k: go(k) for k in loops])
        for key, loop in loops.items():
            assert [h["n"] for h in loop.history] == [2] * 8, (key, loop.history)
        phi_eu = torch.cat([loops[("eu", r)].state.phi for r in (0, 1)])
        torch.testing.assert_close(phi_eu, loops[("us", 0)].state.phi, rtol=0, atol=1e-5)
        assert not torch.equal(th_eu, start)  # they trained
    finally:
        for loop in loops.values():
            loop.close()


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_are_taken_between_fragment_syncs():
    """A real trainer whose outer loop syncs 4 fragments (every 2 steps, each merged 1 step
    later, so one is in flight half the time) against a loopback partner: a checkpoint due
    while a sync is in flight is taken at the next step, when none is."""
    from loco.outer.flat_view import FlatView
    from tests.test_trainer_ckpt import make_trainer

    steps = 12
    trainer = make_trainer(steps)
    flat = FlatView(trainer.engine)
    numel = flat.numel
    ports = ports_for(["eu", "us"])

    def loop_for(name, view, padded):
        node = GossipNode(
            site=name, rank=0, nproc=1, flat_size=padded, run_id=RUN,
            layout_hash=flat.layout_hash, listen=f"127.0.0.1:{ports[name]}",
            peers={n: f"127.0.0.1:{ports[n]}" for n in ports if n != name}, insecure=True,
            heartbeat=False, pull_timeout_s=10.0, hello_timeout_s=1.0, keep_rounds=2 * F,
        ).start()  # fmt: skip
        pay = RangePayloads(shard=(view.slo, view.shi), owned=(view.lo, view.hi), codec="int8",
                            delta_options=_options("int8"), flat_size=padded)  # fmt: skip
        return OuterLoop(step=build_outer("noloco"), flat=view, H=H, steps=steps, node=node,
                         payloads=pay, site=name, linger_s=2.0, fragments=F, fragment_tau=1,
                         payloads_for=_payloads_for("int8"))  # fmt: skip

    outer = loop_for("eu", flat, flat.padded)
    other = FakeFlat(flat.master().detach().clone())
    other.layout_hash = flat.layout_hash
    partner = loop_for("us", other, numel)
    saved, in_flight = [], []
    trainer.on_step_end = outer.on_step_end
    trainer.checkpoint_ready = outer.settled

    def save(done):
        saved.append(done)
        in_flight.append(outer.pending is not None)

    def partner_steps():
        g = torch.Generator().manual_seed(5)
        for s in range(1, steps + 1):
            other.theta.add_(1e-3 * torch.randn(numel, generator=g))
            partner.on_step_end(s)
        partner.finish()

    try:
        run_parallel([lambda: trainer.fit(0, checkpoint=save, ckpt_every=4), partner_steps],
                     timeout=120)  # fmt: skip
        # due at 4 and 8 (a sync opened at each): taken at 5 and 9, after its merge; 12 is the
        # last step, where everything merges
        assert saved == [5, 9, 12] and not any(in_flight)
        assert [h["n"] for h in outer.history] == [2] * 6
    finally:
        outer.close()
        partner.close()
