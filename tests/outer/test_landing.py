"""Sequential landing (``outer.phi_landing``, loco/outer/landing.py) on loopback: real
GossipNodes, real lattice and ternary frames, sites as threads.

Every member of a group lands on one point, bitwise (a pair or a triple that meets every round
keeps one phi); a site sends the lattice frame only when it leads and a ternary offset when it
follows; with pairs that change, the landing point is the group's exact mean up to the codes'
error; a failed lattice block keeps the follower's own phi; any failed pull of the landing
leaves the phi where it was.
"""

from __future__ import annotations

import pytest
import torch

from loco.compress import make_codec
from loco.compress.wire import HEADER_SIZE
from loco.outer import lattice, offset_code, phi_sketch
from loco.outer.exchange import codec_options
from loco.outer.landing import Landing, leader_of
from tests.outer.test_loop import P, inner_steps, make_sites, ports_for, run_parallel

OPTS = codec_options("ternary", block=256, scale_dtype="fp32", stochastic=False, topk_fraction=0.1)


def landing_sites(names, **kw):
    """Sites with the ternary delta codec, lattice phi and (``land``) the landing; one start."""
    land = kw.pop("land", True)
    window = kw.pop("window", "history")
    offsets = kw.pop("offsets", "ternary")
    sites = make_sites(names, ports_for(names), codec="ternary", phi_lattice=True, **kw)
    first = sites[names[0]]
    for loop in sites.values():
        loop.flat.theta.copy_(first.flat.theta)  # sites start from one model, as in a run
        loop.state.phi.copy_(first.state.phi)
        if land:
            opts = OPTS if offsets == "ternary" else {}
            loop.payloads.landing = Landing(loop.payloads, codec=offsets, options=opts,
                                            window=window)  # fmt: skip
    return sites


def close(*groups):
    for sites in groups:
        for loop in sites.values():
            loop.close()


def train(sites, steps, start=0):
    run_parallel([lambda s=s, i=i: inner_steps(s, start, steps, i)
                  for i, s in enumerate(sites.values())])  # fmt: skip


def test_leader_rotates_and_the_point_sums_in_order():
    assert [leader_of(["us", "eu"], t) for t in range(4)] == ["eu", "us", "eu", "us"]
    assert leader_of(["c", "a", "b"], 5) == "c"
    lead = torch.tensor([1.0, 2.0])
    offs = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.0])]
    assert torch.equal(Landing.point(lead, offs), torch.tensor([1.75, 1.0]))


def test_a_pair_keeps_one_phi_and_the_follower_sends_an_offset():
    sites = landing_sites(["eu", "us"])
    try:
        eu, us = sites["eu"], sites["us"]
        train(sites, 20)  # H = 5: 4 rounds
        assert [r["n"] for r in eu.history] == [2] * 4
        assert [r["mean_crc"] for r in eu.history] == [r["mean_crc"] for r in us.history]
        assert torch.equal(eu.state.phi, us.state.phi)  # one landing point, one momentum
        for loop in (eu, us):  # the record's miss is the one fed back into the next frame
            kept = loop.payloads.landing.miss.double().pow(2).mean().sqrt()
            assert loop.history[-1]["landing_miss"] == pytest.approx(float(kept), rel=1e-9)
            assert all(r["landing_miss"] > 0 for r in loop.history)
        delta = HEADER_SIZE + make_codec("ternary", **OPTS).payload_nbytes(P)
        for t, (a, b) in enumerate(zip(eu.history, us.history, strict=True), start=1):
            lead, follow = (a, b) if leader_of(["eu", "us"], t) == "eu" else (b, a)
            # the leader's phi frame crosses once, the follower's offset once
            assert lead["bytes_sent"] >= delta + lattice.frame_bytes(P, 256, 2)
            assert follow["bytes_sent"] <= 2 * delta + 64, (t, follow["bytes_sent"], delta)
            assert follow["bytes_sent"] < lead["bytes_sent"] / 2
    finally:
        close(sites)


def test_a_triple_lands_together():
    sites = landing_sites(["asia", "eu", "us"])
    try:
        train(sites, 15)
        crcs = [[r["mean_crc"] for r in s.history] for s in sites.values()]
        assert crcs[0] == crcs[1] == crcs[2] and len(crcs[0]) == 3
        assert all(r["n"] == 3 for s in sites.values() for r in s.history)
        phis = [s.state.phi for s in sites.values()]
        assert torch.equal(phis[0], phis[1]) and torch.equal(phis[0], phis[2])
    finally:
        close(sites)


@pytest.mark.parametrize(
    "bits,margin,window,offsets,bound,consensus",
    [(8, 8.0, "history", "ternary", 0.25, "weights"), (4, 3.0, "history", "ternary", 0.3, "weights"),
     (3, 1.5, "sketch", "ternary", 0.3, "weights"), (4, 3.0, "history", "normal3", 0.2, "weights"),
     (4, 1.5, "scaled", "normal2", 0.2, "weights"), (4, 3.0, "scaled", "normal2", 0.8, "stepped")],
)  # fmt: skip
def test_changing_pairs_land_near_the_exact_mean(bits, margin, window, offsets, bound, consensus,
                                                 monkeypatch):  # fmt: skip
    """Four sites, pairs that change every round: the same training and deltas with exact fp32
    phi (two-way: the exact mean) against the landing, with 8-bit leader frames and with 4-bit
    ones under a 3x window. The landing's phi stays within a small part of how far the exact
    run's sites are apart. ``stepped``: the pairs code and land their stepped points, no delta
    travels (the exact run too)."""
    names = ["af", "asia", "eu", "us"]
    sized = []  # the frames whose windows came from this round's sketches
    for rule in ("steps_from_sketches", "scaled_spread"):
        real = getattr(phi_sketch, rule)
        monkeypatch.setattr(phi_sketch, rule,
                            lambda *a, real=real, rule=rule, **k: sized.append(rule)
                            or real(*a, **k))  # fmt: skip
    kw = {"alpha": 0.8, "gamma": 1.0, "consensus": consensus, "nesterov": True}
    if consensus == "weights":
        kw = None  # the loop tests' spec-form constants, as before
    landed = landing_sites(names, H=5, phi_lattice_bits=bits, phi_lattice_margin=margin,
                           window=window, offsets=offsets, outer_kw=kw)  # fmt: skip
    exact = make_sites(names, ports_for(names), codec="ternary", H=5, outer_kw=kw)
    try:
        first = exact[names[0]]
        for loop in exact.values():
            loop.flat.theta.copy_(landed[names[0]].flat.theta)
            loop.state.phi.copy_(first.flat.theta)
        train(landed, 30)
        train(exact, 30)
        for s in names:
            assert all(r["n"] == 2 for r in landed[s].history), landed[s].history
        # every pair lands on one point in every round, round 2 included (round 1's partners
        # all start from one phi: what they see is the code's rounding, not a distance)
        for s in names:
            for t, r in enumerate(landed[s].history):
                mate = landed[r["partner"]].history[t]
                assert mate["partner"] == s and mate["mean_crc"] == r["mean_crc"], (s, t)
        assert sum(loop.payloads.lattice_failed for loop in landed.values()) == 0
        apart = torch.stack([exact[s].state.phi for s in names])
        spread = float((apart - apart.mean(0)).pow(2).mean().sqrt())
        err = max(float((landed[s].state.phi - exact[s].state.phi).pow(2).mean().sqrt())
                  for s in names)  # fmt: skip
        # measured 0.11 (8 bits), 0.18 (4 bits) and 0.24 (3 bits, sketch): the lattice's error
        # over n plus the ternary offset's, fed back. At 4 bits under a 3x window the grid step
        # is ~3/7 of the largest difference (~3 rms): an error of step / sqrt(12) / n ~ 0.19
        # rms; at 3 bits, 1.5x the largest difference or 5x the sketch's rms over 3 steps: the
        # same or wider
        # with 3-bit Lloyd-Max offsets (error 0.19 of the offset's rms against the ternary
        # code's ~0.44) the lattice's part is left: measured 0.13
        # stepped: the points a pair codes carry the members' own steps (here independent
        # noise), far apart next to where the pairs land, so the error is held to the rms
        # distance the followers decoded instead. A 4-bit grid under a 3x window is ~1.3 rms
        # of that distance a step: ~0.19 of it a round over n = 2, six rounds adding up where
        # the feedback misses them (~0.47), and the offsets' code: measured 0.64 (0.40 for
        # weights against the same distance)
        coded = [r["consensus_distance"] for s in names for r in landed[s].history
                 if r.get("consensus_distance")]  # fmt: skip
        ref = spread if consensus == "weights" else sum(coded) / len(coded)
        assert ref > 0 and err < bound * ref, (err, ref)
        if window == "sketch":
            assert sized == ["steps_from_sketches"] * 12  # 6 rounds, 2 leaders each
        elif window == "scaled":  # every leader with a remembered spread and its shape
            assert set(sized) == {"scaled_spread"} and len(sized) >= 6, sized
        else:
            assert not sized
        assert all(landed[s].payloads.landing.miss is not None for s in names)
    finally:
        close(landed, exact)


def test_failed_lattice_blocks_keep_the_followers_phi():
    """Different random starts: every block of the leader's phi falls outside the follower's
    window. The follower keeps its own phi, the leader lands on its own decoded phi (offsets
    are zero there), the deltas still average."""
    names = ["eu", "us"]
    sites = make_sites(names, ports_for(names), codec="ternary", phi_lattice=True)
    try:
        for loop in sites.values():
            loop.payloads.landing = Landing(loop.payloads, codec="ternary", options=OPTS)
        before = {s: sites[s].state.phi.clone() for s in names}
        train(sites, 5)  # one round
        lead, follow = (
            sites[leader_of(names, 1)],
            sites[names[1 - names.index(leader_of(names, 1))]],
        )
        assert lead.history[0]["n"] == 2 and follow.history[0]["n"] == 2
        assert follow.history[0]["fail_lattice_blocks"] > 0
        assert follow.payloads.lattice_failed == follow.payloads.lattice_blocks
        # no pull: each phi moved by the same momentum step (one mean delta), the leader also
        # by its 8-bit coding error (a 1/4096 floor of its largest phi per block)
        step_f = follow.state.phi - before[follow.site]
        step_l = lead.state.phi - before[lead.site]
        err = float((step_l - step_f).abs().max())
        assert err <= float(before[lead.site].abs().max()) / 4096, err
        gap_before = float((before["eu"] - before["us"]).pow(2).mean().sqrt())
        gap_after = float((sites["eu"].state.phi - sites["us"].state.phi).pow(2).mean().sqrt())
        assert abs(gap_after - gap_before) < 1e-3 * gap_before
    finally:
        close(sites)


def test_a_follower_that_never_sends_an_offset_leaves_the_leader_in_place():
    """eu runs the two-way exchange (no landing): it never publishes an offset. us leads
    round 1, its pull of the offset times out: eu is dropped, us takes the local step."""
    names = ["eu", "us"]
    assert leader_of(names, 1) == "us"
    sites = landing_sites(names, land=False, pull_timeout_s=1.0)
    try:
        us = sites["us"]
        us.payloads.landing = Landing(us.payloads, codec="ternary", options=OPTS)
        train(sites, 5)
        rec = us.history[0]
        assert rec["n"] == 1 and "eu" in rec["dropped"], rec
        assert us.payloads.landing.miss is None  # nothing landed, nothing to feed back
    finally:
        close(sites)


def test_drawn_leader_alternates_where_the_rotation_cannot():
    """A hypercube pair of 4 sites meets every other meeting: the rotation by the meeting's
    number gives it one leader for good; the drawn leader gives each member a share."""
    from loco.outer.landing import drawn_leader, leader_of

    keys = range(1, 80, 2)  # the meetings of one pair
    assert {leader_of(["asia", "eu"], k) for k in keys} == {"eu"}
    drawn = [drawn_leader(["eu", "asia"], k) for k in keys]
    assert 10 <= drawn.count("eu") <= 30 and drawn.count("eu") + drawn.count("asia") == 40
    assert drawn == [drawn_leader(["asia", "eu"], k) for k in keys]  # the order given is moot


def _stepped_pair(**kw):
    """Two sites of the stepped consensus with the landing (4-bit frames under scaled windows,
    normal2 offsets), and the frames they publish: ``(site, round, stream) -> bytes``."""
    kw = {"phi_lattice_bits": 4, "phi_lattice_margin": 1.5, **kw}
    sites = landing_sites(["eu", "us"], H=5, window="scaled", offsets="normal2",
                          outer_kw={"alpha": 0.8, "gamma": 1.0, "consensus": "stepped",
                                    "nesterov": True}, **kw)  # fmt: skip
    sizes: dict[tuple[str, int, str], int] = {}
    for loop in sites.values():
        real = loop.node.publish

        def publish(r, stream, buf, *a, real=real, site=loop.site, **k):
            sizes[(site, r, stream)] = memoryview(buf).nbytes
            return real(r, stream, buf, *a, **k)

        loop.node.publish = publish
    return sites, sizes


def _roles(t):
    lead = leader_of(["eu", "us"], t)
    return lead, "us" if lead == "eu" else "eu"


def test_the_last_meeting_lands_finer():
    """``last_rounds`` {4} of four rounds, 6-bit frame and 4-bit offsets there: the leader's frame
    and the follower's offsets grow by their codes' widths in round 4 alone, and the
    follower's part of the landing's miss (its offset's coding error: 0.34 of the offset's
    rms in 2-bit Lloyd-Max, 0.10 in 4-bit) falls."""
    sites, sizes = _stepped_pair()
    try:
        for loop in sites.values():
            old = loop.payloads.landing
            loop.payloads.landing = Landing(loop.payloads, codec="normal2", window=old.window,
                                            last_codec="normal4", last_bits=6)  # fmt: skip
            loop.payloads.landing.last_rounds = frozenset({4})
        train(sites, 20)
        for t in (2, 3, 4):
            lead, follow = _roles(t)
            bits, obits = (6, 4) if t == 4 else (4, 2)
            assert sizes[(lead, t, "phi")] == lattice.frame_bytes(P, 256, bits), t
            assert sizes[(follow, t, "phioff")] == offset_code.frame_bytes(P, obits), t
        misses = {t: sites[_roles(t)[1]].history[t - 1]["landing_miss"] for t in (2, 3, 4)}
        assert misses[4] < 0.5 * min(misses[2], misses[3]), misses
        assert sites["eu"].history[3]["mean_crc"] == sites["us"].history[3]["mean_crc"]
    finally:
        close(sites)


def test_lattice_blocks_of_512_halve_the_block_overhead():
    """``phi_lattice_block=512``: the leader's frame, the follower's offsets and every
    member's sketch in blocks of 512 (a block's 6 bytes of the frame and 4 of the offsets and
    sketch now cover 512 values), the pair on one point."""
    sites, sizes = _stepped_pair(phi_lattice_block=512)
    try:
        train(sites, 15)
        for t in (2, 3):
            lead, follow = _roles(t)
            assert (
                sites[lead].history[t - 1]["mean_crc"] == sites[follow].history[t - 1]["mean_crc"]
            )
            assert sizes[(lead, t, "phi")] == lattice.frame_bytes(P, 512, 4)
            assert sizes[(follow, t, "phioff")] == offset_code.frame_bytes(P, 2, 512)
            assert sizes[(follow, t, "phisk")] == phi_sketch.frame_bytes(P, 512)
            assert lattice.frame_bytes(P, 256, 4) - lattice.frame_bytes(P, 512, 4) == 6 * (12 - 6)
            assert not sites[follow].history[t - 1].get("fail_lattice_blocks")
    finally:
        close(sites)


def test_the_loop_tells_the_landing_its_last_meetings():
    """A loop built over payloads with a landing sets ``last_rounds`` from its meetings: 40
    steps of H = 5 are rounds 1-8, meetings every other round counted back from 8."""
    from loco.outer import build_outer
    from loco.outer.loop import OuterLoop

    sites = make_sites(["eu"], ports_for(["eu"]), codec="ternary", phi_lattice=True)
    try:
        eu = sites["eu"]
        eu.payloads.landing = Landing(eu.payloads, codec="normal2", last_meetings=2)
        loop = OuterLoop(step=build_outer("noloco"), flat=eu.flat, H=5, steps=40, node=eu.node,
                         payloads=eu.payloads, site="eu", meet_every=2)  # fmt: skip
        assert eu.payloads.landing.last_rounds == frozenset({6, 8})
        loop.close()
    finally:
        close(sites)
