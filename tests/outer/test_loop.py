"""The round driver on loopback: real GossipNodes, real codecs, several sites as threads.

Invariants of the spec: both members of a pair compute identical means from the DECODED values;
identical members give the heavy-ball step without the gamma term; an unreachable partner
gives the local step (n = 1) and training goes on; a bad payload drops the partner and never
reaches the state; error feedback keeps the residual; overlap merges with ``mix``.
"""

from __future__ import annotations

import threading
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loco.compress import decode, encode
from loco.dist import free_port
from loco.gossip import GossipNode
from loco.gossip.agreement import Proposal
from loco.outer import NoLoCo, build_outer, lattice
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.loop import OuterLoop
from loco.summary import outer_summary

RUN, LAYOUT = "outer-test", "layout-x"
P = 3001  # not a multiple of the codec block
A, B, G = 0.5, 0.7, 0.7
DILOCO_CFG = SimpleNamespace(outer=SimpleNamespace(method="diloco"),
                             compression=SimpleNamespace(codec="none"))  # fmt: skip


class FakeFlat:
    """A flat view over a plain tensor (one rank owns everything)."""

    def __init__(self, theta: torch.Tensor) -> None:
        self.theta = theta
        self.lo, self.hi, self.slo, self.shi = 0, theta.numel(), 0, theta.numel()
        self.numel = self.padded = theta.numel()
        self.layout_hash = LAYOUT
        self.syncs = 0

    def master(self) -> torch.Tensor:
        return self.theta

    def sync(self) -> None:
        self.syncs += 1

    def full(self) -> torch.Tensor:
        return self.theta.clone()


def make_sites(names, ports, codec="int8", phi_codec="none", method="noloco", tau=0, mix=0.5,
               seed=0, pull_timeout_s=5.0, H=5, steps=100, ef=True, phi_lattice=False,
               final_average=False, padded=P, final_lattice=False, outer_kw=None,
               loop_kw=None, **lattice_kw):  # fmt: skip
    """``padded`` > P: the site's flat vector is padded past P (as the engine pads to a multiple
    of world * ALIGN), so its one rank's shard [0, padded) reaches past what it owns."""
    sites = {}
    for name in names:
        node = GossipNode(
            site=name, rank=0, nproc=1, flat_size=padded, run_id=RUN, layout_hash=LAYOUT,
            listen=f"127.0.0.1:{ports[name]}",
            peers={n: f"127.0.0.1:{ports[n]}" for n in ports if n != name},
            insecure=True, heartbeat=False, seed=seed, pull_timeout_s=pull_timeout_s,
            hello_timeout_s=1.0, max_retries=1, backoff_s=0.05,
        ).start()  # fmt: skip
        theta = torch.from_numpy(
            np.random.default_rng(zlib.crc32(name.encode())).standard_normal(P).astype(np.float32)
        )
        flat = FakeFlat(theta)
        pay = RangePayloads(
            shard=(0, padded), owned=(0, P), codec=codec, phi_codec=phi_codec,
            delta_options=codec_options(codec, block=256, scale_dtype="fp32", stochastic=False,
                                        topk_fraction=0.1),
            phi_options=codec_options(phi_codec, block=256, scale_dtype="fp32", stochastic=False,
                                      topk_fraction=0.1),
            error_feedback=ef, phi_lattice=phi_lattice, **lattice_kw,
        )  # fmt: skip
        loop = OuterLoop(
            step=build_outer(method, **{"alpha": A, "beta": B, "gamma": G, **(outer_kw or {})}),
            flat=flat, H=H, steps=steps,
            node=node, payloads=pay, site=name, all_live=method == "diloco", tau=tau, mix=mix,
            linger_s=2.0, final_average=final_average, final_lattice=final_lattice,
            **(loop_kw or {}),
        )  # fmt: skip
        sites[name] = loop
    return sites


def proposes_pair(node, t, other):
    """A bare node (no outer loop) proposes the pair {node, other} for round ``t``, as a real
    partner's loop does before it pulls (the pairing agreement)."""
    node.server.agreement.propose(Proposal(node.site, t, tuple(sorted((node.site, other)))))


def published_streams(sites) -> list[str]:
    """The stream names every site's node publishes from now on, in order (a wrapper around
    each node's ``publish``; the node itself is unchanged)."""
    streams: list[str] = []
    for loop in sites.values():
        real = loop.node.publish
        loop.node.publish = lambda r, stream, *a, real=real, **k: (
            streams.append(stream) or real(r, stream, *a, **k)
        )
    return streams


def ports_for(names):
    return {n: free_port() for n in names}


def run_parallel(fns, timeout=60):
    errors = []

    def wrap(f):
        try:
            f()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(f,)) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a site is stuck"
    if errors:
        raise errors[0]


def inner_steps(loop, start, k, rng_seed):
    """Stand-in for training: move theta a little, then call the hook."""
    g = torch.Generator().manual_seed(rng_seed)
    for s in range(start + 1, start + k + 1):
        loop.flat.theta.add_(0.01 * torch.randn(P, generator=g))
        loop.on_step_end(s)


@pytest.fixture
def pair():
    made = []

    def mk(**kw):
        names = ["eu", "us"]
        sites = make_sites(names, ports_for(names), **kw)
        made.append(sites)
        return sites

    yield mk
    for sites in made:
        for loop in sites.values():
            loop.close()


def test_pair_identical_means_and_numpy_reference(pair):
    sites = pair(codec="int8")
    phi0 = {n: s.state.phi.clone() for n, s in sites.items()}
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 5, i) for i, s in enumerate(sites.values())])
    eu, us = sites["eu"], sites["us"]
    assert eu.history[0]["n"] == 2 and us.history[0]["n"] == 2
    assert eu.history[0]["partner"] == "us"
    assert eu.history[0]["mean_crc"] == us.history[0]["mean_crc"]
    assert torch.equal(eu.last_means[0], us.last_means[0])
    assert torch.equal(eu.last_means[1], us.last_means[1])
    # NumPy reference of round 1 (momentum zero) on the means of the DECODED values
    theta = {n: s.flat.theta for n, s in sites.items()}
    mean_delta = eu.last_means[0].double().numpy()
    mean_phi = np.mean([phi0[n].double().numpy() for n in sites], 0)
    for n, s in sites.items():
        m = B * mean_delta - G * (phi0[n].double().numpy() - mean_phi)
        np.testing.assert_allclose(s.state.phi.double().numpy(), phi0[n].double().numpy() + m,
                                   rtol=0, atol=1e-5)  # fmt: skip
        np.testing.assert_array_equal(theta[n].numpy(), s.state.phi.numpy())
    assert eu.history[0]["consensus_distance"] > 0
    assert eu.history[0]["bytes_recv"] > 0 and us.history[0]["bytes_recv"] > 0
    # a site's served bytes land in the round record open when the partner pulls: the site that
    # merges first may not have been pulled yet, the other one has been
    assert eu.history[0]["bytes_sent"] + us.history[0]["bytes_sent"] > 0


def test_decoded_values_are_used(pair):
    """The published int8 delta frame decodes to exactly the delta each member averaged."""
    sites = pair(codec="int8", ef=False)
    th0 = {n: s.flat.theta.clone() for n, s in sites.items()}
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 5, i) for i, s in enumerate(sites.values())])
    deltas = []
    for i, n in enumerate(sorted(sites)):
        g = torch.Generator().manual_seed(i)
        th = th0[n].clone()
        for _ in range(5):
            th.add_(0.01 * torch.randn(P, generator=g))
        deltas.append(decode(encode(th - th0[n], "int8", block=256)))
    ref = torch.stack(deltas).mean(0)
    assert torch.equal(sites["eu"].last_means[0], ref)


def test_identical_members_give_heavy_ball_step(pair):
    sites = pair(codec="none")
    eu, us = sites["eu"], sites["us"]
    us.flat.theta.copy_(eu.flat.theta)
    us.state.phi.copy_(eu.state.phi)
    phi0 = eu.state.phi.clone()
    run_parallel([lambda s=s: inner_steps(s, 0, 5, 7) for s in sites.values()])  # same steps
    delta = eu.last_means[0]
    torch.testing.assert_close(eu.state.phi, phi0 + B * delta, rtol=0, atol=1e-6)
    assert torch.equal(eu.state.phi, us.state.phi)


def test_unreachable_partner_gives_local_step():
    ports = ports_for(["eu", "us"])
    sites = make_sites(["eu"], ports, codec="none", pull_timeout_s=2.0)  # us never starts
    eu = sites["eu"]
    try:
        phi0, th0 = eu.state.phi.clone(), eu.flat.theta.clone()
        inner_steps(eu, 0, 5, 3)
        rec = eu.history[0]
        assert rec["n"] == 1 and rec["partner"] == "us" and rec["dropped"].startswith("us:")
        g = torch.Generator().manual_seed(3)
        th = th0.clone()
        for _ in range(5):
            th.add_(0.01 * torch.randn(P, generator=g))
        torch.testing.assert_close(eu.state.phi, phi0 + B * (th - phi0), rtol=0, atol=1e-6)
        assert rec["round_seconds"] < 4.0
        inner_steps(eu, 5, 5, 4)  # training goes on
        assert len(eu.history) == 2
    finally:
        eu.close()


@pytest.mark.parametrize("bad", ["nan_phi", "short_delta", "corrupt_delta"])
def test_bad_payload_drops_partner_and_leaves_state(bad):
    ports = ports_for(["eu", "us"])
    sites = make_sites(["eu"], ports, codec="int8", pull_timeout_s=3.0)
    eu = sites["eu"]
    evil = GossipNode(site="us", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                      listen=f"127.0.0.1:{ports['us']}", peers={"eu": f"127.0.0.1:{ports['eu']}"},
                      insecure=True, heartbeat=False).start()  # fmt: skip
    try:
        good_delta = encode(torch.zeros(P), "int8", block=256)
        phi = np.zeros(P, np.float32)
        proposes_pair(evil, 1, "eu")
        if bad == "nan_phi":
            phi[7] = np.nan
            evil.publish(1, "delta", good_delta, codec="int8")
            evil.publish(1, "phi", phi)
        elif bad == "short_delta":  # a well-formed frame of the wrong length
            evil.publish(1, "delta", encode(torch.zeros(P - 1), "int8", block=256), codec="int8")
            evil.publish(1, "phi", phi)
        else:
            buf = bytearray(good_delta)
            buf[-1] ^= 0xFF  # payload checksum mismatch
            evil.publish(1, "delta", bytes(buf), codec="int8")
            evil.publish(1, "phi", phi)
        phi0, m0 = eu.state.phi.clone(), eu.state.momentum.clone()
        th0 = eu.flat.theta.clone()
        inner_steps(eu, 0, 5, 1)
        rec = eu.history[0]
        assert rec["n"] == 1 and "us:bad_payload" in rec["dropped"], rec
        assert rec.get("fail_bad_payload", 0) >= 1  # counted in the round's record
        assert rec.get("strikes", 0) >= 1  # a frame that does not assemble earns a strike too
        assert m0.abs().sum() == 0
        # exactly the local step on this site's own decoded delta
        assert torch.isfinite(eu.state.phi).all()
        torch.testing.assert_close(eu.state.phi, phi0 + B * eu.last_means[0], rtol=0, atol=1e-6)
        assert not torch.equal(eu.flat.theta, th0)
    finally:
        evil.close()
        eu.close()


def test_error_feedback_residual_kept(pair):
    sites = pair(codec="int4", ef=True)
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 10, i) for i, s in enumerate(sites.values())])
    ef = sites["eu"].payloads.ef
    assert ef is not None and ef.residual.abs().sum() > 0 and ef.calls == 2


def test_diloco_three_sites_all_pull_everyone():
    names = ["asia", "eu", "us"]
    sites = make_sites(names, ports_for(names), codec="none", method="diloco")
    try:
        run_parallel(
            [lambda s=s, i=i: inner_steps(s, 0, 5, i) for i, s in enumerate(sites.values())]
        )
        crcs = {s.history[0]["mean_crc"] for s in sites.values()}
        assert len(crcs) == 1
        assert all(s.history[0]["n"] == 3 for s in sites.values())
        # DiLoCo: every site ends on the same phi when they start from the same phi
    finally:
        for s in sites.values():
            s.close()


def test_local_never_talks():
    theta = torch.randn(P)
    flat = FakeFlat(theta)
    loop = OuterLoop(step=build_outer("local", alpha=A, beta=B), flat=flat, H=5, steps=20)
    phi0 = loop.state.phi.clone()
    inner_steps(loop, 0, 5, 0)
    assert loop.history[0]["n"] == 1 and loop.history[0]["bytes_sent"] == 0
    torch.testing.assert_close(loop.state.phi, phi0 + B * loop.last_means[0])


def overlap_steps(sites, watch, snap_at):
    """Inner steps 1..7 on every site (noise of its own seed; with ``tau=2`` and H = 5 a round
    starts at step 5 and merges at 7). Returns ``watch``'s weights just before the hook of each
    step in ``snap_at``, and ``in_flight``: after step 5's hook a round was pending and the
    loop not settled."""
    seen = {}

    def run(s, i):
        g = torch.Generator().manual_seed(i)
        for step in range(1, 8):
            s.flat.theta.add_(0.01 * torch.randn(P, generator=g))
            if step in snap_at and s is watch:
                seen[step] = s.flat.theta.clone()
            s.on_step_end(step)
            if step == 5 and s is watch:
                seen["in_flight"] = s.pending is not None and not s.settled()

    run_parallel([lambda s=s, i=i: run(s, i) for i, s in enumerate(sites.values())])
    return seen


def test_overlap_merges_with_mix(pair):
    sites = pair(codec="none", tau=2, mix=0.5, loop_kw={"merge": "mix"})
    eu = sites["eu"]
    seen = overlap_steps(sites, eu, (7,))
    # training goes on while the pull runs, and no checkpoint may be taken then
    assert seen["in_flight"]
    assert eu.pending is None and eu.settled() and eu.history[0]["n"] == 2
    want = 0.5 * seen[7] + 0.5 * eu.state.phi
    torch.testing.assert_close(eu.flat.theta, want, rtol=0, atol=1e-6)
    assert sites["us"].history[0]["mean_crc"] == eu.history[0]["mean_crc"]


def test_overlap_merge_carry_lands_phi_plus_the_overlaps_own_progress(pair):
    """``merge="carry"`` (the default): ``tau`` steps after the boundary the weights become the
    new phi plus what the site trained since the boundary (``theta_local - theta_boundary``)."""
    sites = pair(codec="none", tau=2)
    eu = sites["eu"]
    seen = overlap_steps(sites, eu, (5, 7))
    assert eu.pending is None and eu.history[0]["n"] == 2
    want = eu.state.phi + (seen[7] - seen[5])
    torch.testing.assert_close(eu.flat.theta, want, rtol=0, atol=1e-6)
    mix = 0.5 * seen[7] + 0.5 * eu.state.phi  # what mix would have given
    assert float((eu.flat.theta - mix).abs().max()) > 1e-3


def test_an_unknown_merge_rule_is_refused():
    from loco.outer.round import Rounds

    with pytest.raises(ValueError, match="merge='blend'"):
        Rounds(method=None, flat=None, state=None, node=None, payloads=None, site="eu",
               all_live=False, mix=0.5, pool=None, pull_timeout_s=None, publish=None,
               merge="blend")  # fmt: skip


def test_noloco_apply_rejects_nonfinite_without_touching_state():
    st_phi = torch.randn(10)
    from loco.outer import OuterState

    st = OuterState.start(st_phi)
    before = (st.phi.clone(), st.momentum.clone())
    bad = torch.full((10,), float("nan"))
    with pytest.raises(ValueError):
        NoLoCo().apply(torch.zeros(10), st, [torch.zeros(10), bad], [st.phi, st.phi])
    assert torch.equal(st.phi, before[0]) and torch.equal(st.momentum, before[1])


def test_lattice_phi_pairs_agree_and_cost_about_a_byte(pair):
    sites = pair(codec="int8", phi_lattice=True)
    eu, us = sites["eu"], sites["us"]
    us.flat.theta.copy_(eu.flat.theta)  # sites start from the same weights, as in a real run
    us.state.phi.copy_(eu.state.phi)
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 20, i) for i, s in enumerate(sites.values())])
    assert [r["n"] for r in eu.history] == [2, 2, 2, 2]
    assert [r["mean_crc"] for r in eu.history] == [r["mean_crc"] for r in us.history]
    # what the partner pulled in a round (the cheapest of rounds 2-4: on a loaded machine a
    # timed-out pull is retried, and a retry is served and counted again)
    per_round = min(r["bytes_sent"] for r in eu.history[1:]) / P
    assert per_round < 1.03 + 1.1  # int8 delta + lattice phi, vs 5.02 with exact phi
    # pairs that landed together are one phi: their frames show only rounding, not counted
    assert all(not r.get("window_slack_blocks") for r in eu.history)


def test_the_record_has_the_partners_window_slack(pair):
    """Sites a little apart (1e-4 rms; the 8-bit rules' windows are far wider): the slack is
    counted on every block of every round, more than a bit per value."""
    sites = pair(codec="int8", phi_lattice=True)
    eu, us = sites["eu"], sites["us"]
    us.flat.theta.copy_(eu.flat.theta)
    g = torch.Generator().manual_seed(0)
    us.state.phi.copy_(eu.state.phi + 1e-4 * torch.randn(eu.state.phi.shape, generator=g))
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 10, i) for i, s in enumerate(sites.values())])
    blocks = [r.get("window_slack_blocks", 0) for r in eu.history]
    assert len(blocks) == 2 and all(b == -(-P // 256) for b in blocks), blocks
    assert all(r["window_slack_bits"] / r["window_slack_blocks"] > 1.0 for r in eu.history)


def test_lattice_phi_too_far_keeps_our_own_phi_and_averages_the_delta(pair):
    sites = pair(codec="int8", phi_lattice=True)  # different random starts: phis far apart
    eu = sites["eu"]
    phi0 = eu.state.phi.clone()
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 5, i) for i, s in enumerate(sites.values())])
    rec = eu.history[0]
    assert rec["n"] == 2 and not rec["dropped"]  # the delta is used
    pay = eu.payloads
    assert pay.lattice_blocks > 0 and pay.lattice_failed == pay.lattice_blocks
    assert rec["fail_lattice_blocks"] == pay.lattice_blocks  # counted in the outer record
    # no pull toward the partner's phi: eu's phi moved by its outer step only, which is the
    # same as with its own phi in the partner's place
    assert not torch.equal(eu.state.phi, phi0)


def test_low_bit_lattice_every_other_round_pairs_agree_and_cost_little(pair):
    sites = pair(codec="int8", phi_lattice=True, phi_lattice_bits=3, phi_every=2)
    eu, us = sites["eu"], sites["us"]
    us.flat.theta.copy_(eu.flat.theta)
    us.state.phi.copy_(eu.state.phi)
    run_parallel([lambda s=s, i=i: inner_steps(s, 0, 30, i) for i, s in enumerate(sites.values())])
    assert [r["n"] for r in eu.history] == [2] * 6
    assert [r["mean_crc"] for r in eu.history] == [r["mean_crc"] for r in us.history]
    # over the 6 rounds: 6 int8 deltas, phi at 8 bits once (nothing observed yet), then at most
    # two 3-bit frames (3/8 byte + 6 bytes per block of 256), and 28-byte frames without values
    from loco.compress import make_codec
    from loco.compress.wire import HEADER_SIZE
    from loco.outer import lattice

    opts = codec_options("int8", block=256, scale_dtype="fp32", stochastic=False, topk_fraction=0.1)
    delta = HEADER_SIZE + make_codec("int8", **opts).payload_nbytes(P)
    phi = lattice.frame_bytes(P, 256, 8) + 2 * lattice.frame_bytes(P, 256, 3) + 3 * 28
    total = sum(r["bytes_sent"] for r in eu.history)
    assert total <= 6 * delta + phi
    assert phi < 6 * 4 * P / 10  # over 10x fewer phi bytes than exact fp32 phi
    assert eu.payloads.lattice_failed == 0


@pytest.mark.parametrize("bad", ["huge_delta", "huge_phi"])
def test_finite_garbage_drops_partner_and_leaves_state(bad):
    """1e30 everywhere is finite and well-formed, yet never applied: the plausibility bound."""
    ports = ports_for(["eu", "us"])
    eu = make_sites(["eu"], ports, codec="none", pull_timeout_s=3.0)["eu"]
    evil = GossipNode(site="us", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                      listen=f"127.0.0.1:{ports['us']}", peers={"eu": f"127.0.0.1:{ports['eu']}"},
                      insecure=True, heartbeat=False).start()  # fmt: skip
    try:
        huge = np.full(P, 1e30, np.float32)
        like = eu.flat.theta.numpy().copy()  # a phi as close as a real partner's
        proposes_pair(evil, 1, "eu")
        evil.publish(1, "delta", huge if bad == "huge_delta" else np.zeros(P, np.float32))
        evil.publish(1, "phi", huge if bad == "huge_phi" else like)
        phi0 = eu.state.phi.clone()
        inner_steps(eu, 0, 5, 1)
        rec = eu.history[0]
        assert rec["n"] == 1 and "us:implausible" in rec["dropped"], rec
        assert rec.get("strikes", 0) == 1, rec  # an implausible payload earns a strike
        torch.testing.assert_close(eu.state.phi, phi0 + B * eu.last_means[0], rtol=0, atol=1e-6)
        assert float(eu.state.phi.abs().max()) < 1e3
    finally:
        evil.close()
        eu.close()


def test_implausible_partner_is_banned_after_its_strikes():
    """Three implausible payloads (gossip.strikes) ban the partner: round 4 does not pull it."""
    ports = ports_for(["eu", "us"])
    eu = make_sites(["eu"], ports, codec="none", pull_timeout_s=3.0)["eu"]
    evil = GossipNode(site="us", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                      listen=f"127.0.0.1:{ports['us']}", peers={"eu": f"127.0.0.1:{ports['eu']}"},
                      insecure=True, heartbeat=False).start()  # fmt: skip
    try:
        for t in range(1, 5):  # the mailbox keeps two rounds: publish each one just in time
            proposes_pair(evil, t, "eu")
            evil.publish(t, "delta", np.full(P, 1e30, np.float32))
            evil.publish(t, "phi", eu.flat.theta.numpy().copy())
            inner_steps(eu, 5 * (t - 1), 5, t)
        causes = [h["dropped"] for h in eu.history]
        assert causes == ["us:implausible"] * 3 + ["us:banned"], causes
        assert eu.history[2].get("bans", 0) == 1
        assert evil.server.metrics.snapshot().get("served_pulls", 0) == 6  # none in round 4
    finally:
        evil.close()
        eu.close()


def test_implausible_bounds():
    from loco.outer.loop import MAX_DELTA_RATIO, implausible

    g = torch.Generator().manual_seed(0)
    phi = 0.02 * torch.randn(10_000, generator=g)
    d = 1e-3 * torch.randn(10_000, generator=g)
    # a real partner: another site's delta of the same size, phi a little apart; even another
    # random init is accepted (sqrt(2) x the weights' RMS apart)
    assert implausible(1e-3 * torch.randn(10_000, generator=g), phi + 1e-4, d, phi) == ""
    assert implausible(d, 0.02 * torch.randn(10_000, generator=g), d, phi) == ""
    assert "delta" in implausible(d * (MAX_DELTA_RATIO * 2), phi, d, phi)
    assert "phi" in implausible(d, phi + 1.0, d, phi)  # 50x the weights' RMS away
    assert implausible(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0)) == ""


def _train_to_end(loop, steps, seed, before_last):
    """Inner steps 1..steps; ``before_last[site]`` = theta right before the last hook."""
    g = torch.Generator().manual_seed(seed)
    for s in range(1, steps + 1):
        loop.flat.theta.add_(0.01 * torch.randn(P, generator=g))
        if s == steps:
            before_last[loop.site] = loop.flat.theta.clone()
        loop.on_step_end(s)
    loop.finish()


def test_final_average_ends_every_site_on_one_model():
    names = ["asia", "eu", "sa", "us"]
    steps = 12  # rounds at 5 and 10; two more inner steps before the final average
    sites = make_sites(names, ports_for(names), steps=steps, final_average=True)
    before: dict[str, torch.Tensor] = {}
    try:
        run_parallel([lambda s=s, i=i: _train_to_end(s, steps, i, before)
                      for i, s in enumerate(sites.values())])  # fmt: skip
        # raw fp32 payloads, averaged in site order: bit-identical on every site
        want = torch.stack([before[n] for n in sorted(names)]).mean(0)
        for s in sites.values():
            assert torch.equal(s.flat.theta, want), s.site
            assert torch.equal(s.state.phi, want), s.site
            f = s.final
            assert f["n"] == 4 and f["dropped"] == "" and f["partner"].count(",") == 2
            # this site pulled three peers' fp32 weights before it averaged (what it served
            # depends on when the others pulled: finish() lingers for them at most linger_s)
            assert f["bytes_recv"] >= 3 * 4 * P
            assert f["consensus_distance"] > 0  # measured before averaging
            assert len(s.history) == 2  # the final average is not an outer round
        assert len({s.final["mean_crc"] for s in sites.values()}) == 1
    finally:
        for s in sites.values():
            s.close()


def test_final_average_leaves_out_a_dead_site_without_blocking():
    ports = ports_for(["eu", "us", "sa"])
    sites = make_sites(["eu", "us"], ports, steps=12, final_average=True, pull_timeout_s=1.5)
    before: dict[str, torch.Tensor] = {}
    try:  # sa never starts: not live, or unreachable within the pull deadline
        run_parallel([lambda s=s, i=i: _train_to_end(s, 12, i, before)
                      for i, s in enumerate(sites.values())], timeout=30)  # fmt: skip
        want = torch.stack([before["eu"], before["us"]]).mean(0)
        for s in sites.values():
            assert torch.equal(s.flat.theta, want)
            assert s.final["n"] == 2
            assert s.final["round_seconds"] < 5.0
    finally:
        for s in sites.values():
            s.close()


def test_final_average_is_off_for_diloco_and_local():
    names = ["eu", "us"]
    sites = make_sites(names, ports_for(names), method="diloco", final_average=True)
    try:
        assert not any(s.final_average for s in sites.values())
    finally:
        for s in sites.values():
            s.close()
    loop = OuterLoop(step=build_outer("local", alpha=A, beta=B), flat=FakeFlat(torch.randn(P)),
                     H=5, steps=5, final_average=True)  # fmt: skip
    inner_steps(loop, 0, 5, 0)
    assert loop.final is None


@pytest.mark.parametrize("reduce", ["sliced", "full"])
def test_diloco_partial_last_round_ends_every_site_on_one_model(reduce):
    """DiLoCo whose ``steps`` is not a multiple of H (rounds at 5 and 10 of 12): the last two
    steps' progress syncs at step 12 as round 3 and lands on the group's mean of the weights,
    with no outer step (the momentum and the rounds as they were), so the sites end on one
    model; the record says ``closing`` and the summary does not count it as a round."""
    names = ["asia", "eu", "us"]
    steps = 12
    sites = make_sites(names, ports_for(names), codec="none", method="diloco", steps=steps,
                       loop_kw={"diloco_reduce": reduce})  # fmt: skip
    for s in sites.values():  # DiLoCo's sites start from one phi
        s.flat.theta.copy_(sites["eu"].flat.theta)
        s.state.phi.copy_(sites["eu"].flat.theta)
    before: dict[str, torch.Tensor] = {}
    momentum: dict[str, torch.Tensor] = {}

    def go(loop, seed):
        _train_to_end(loop, steps, seed, before)

    for s in sites.values():
        real = s._close_tails

        def spy(done, s=s, real=real):
            momentum[s.site] = s.state.momentum.clone()
            real(done)

        s._close_tails = spy
    try:
        run_parallel([lambda s=s, i=i: go(s, i) for i, s in enumerate(sites.values())])
        want = torch.stack([before[n] for n in sorted(names)]).mean(0)
        assert float((before["eu"] - before["us"]).abs().max()) > 1e-3  # the tails differ
        for s in sites.values():
            torch.testing.assert_close(s.flat.theta, want, rtol=0, atol=1e-6)
            assert torch.equal(s.flat.theta, s.state.phi)
            assert torch.equal(s.state.momentum, momentum[s.site])
            assert s.state.rounds == 2
            assert [(h["step"], h["round"], bool(h.get("closing"))) for h in s.history] == [
                (5, 1, False), (10, 2, False), (12, 3, True)]  # fmt: skip
            assert [h["n"] for h in s.history] == [3, 3, 3]
            assert outer_summary(DILOCO_CFG, s, steps)["rounds"] == 2
        assert len({s.flat.theta.sum().item() for s in sites.values()}) == 1
    finally:
        for s in sites.values():
            s.close()


def _int8_closing(padded=P):
    """``closing_for`` of ``make_sites``' payloads: int8 deltas and slice averages."""
    opts = codec_options("int8", block=256, scale_dtype="fp32", stochastic=False,
                         topk_fraction=0.1)  # fmt: skip

    def build(span=None):
        lo, hi = span or (0, padded)
        return RangePayloads(shard=(lo, hi), owned=(lo, min(hi, P)), codec="int8",
                             delta_options=opts, mean_codec="int8", mean_options=opts)  # fmt: skip

    return build


@pytest.mark.parametrize("reduce", ["sliced", "full"])
def test_diloco_closing_in_its_own_codec_lands_the_mean_with_the_residual(reduce):
    """``closing_for`` (``compression.closing_codec=int8``) under ternary rounds: the closing
    sync travels in int8 and carries each site's unsent residual, so the sites end within int8's
    error (two codings: the deltas and the slice averages) of the mean of ``theta + residual``,
    where a ternary closing misses it by far more."""
    names = ["asia", "eu", "us"]
    steps = 12
    sites = make_sites(names, ports_for(names), codec="ternary", method="diloco", steps=steps,
                       loop_kw={"closing_for": _int8_closing(), "diloco_reduce": reduce})  # fmt: skip
    for s in sites.values():
        s.flat.theta.copy_(sites["eu"].flat.theta)
        s.state.phi.copy_(sites["eu"].flat.theta)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    phis: dict[str, torch.Tensor] = {}
    labels: list[tuple[int, str]] = []
    for s in sites.values():
        real_close, real_publish = s._close_tails, s.node.publish

        def spy(done, s=s, real=real_close):
            seen[s.site] = s.flat.theta.clone(), s.payloads.ef.residual[:P].clone()
            phis[s.site] = s.state.phi.clone()
            real(done)

        def publish(r, stream, *a, real=real_publish, **k):
            segs = k.get("segments") or []
            labels.extend((r, c) for c in [k.get("codec")] + [g.codec for g in segs] if c)
            return real(r, stream, *a, **k)

        s._close_tails, s.node.publish = spy, publish
    try:
        run_parallel([lambda s=s, i=i: _train_to_end(s, steps, i, {})
                      for i, s in enumerate(sites.values())])  # fmt: skip
        phi_before = phis["eu"]
        assert all(torch.equal(p, phi_before) for p in phis.values())  # DiLoCo: one phi
        sent = torch.stack([seen[n][0] + seen[n][1] for n in sorted(names)])  # theta + residual
        want = sent.mean(0)
        v = sent - phi_before  # what each site's closing delta encodes
        atol = 2 * float(v.abs().max()) / 127  # int8: half a step of 1/127 of a block's max, twice
        for s in sites.values():
            assert float((s.flat.theta - want).abs().max()) <= atol
            assert [h["round"] for h in s.history] == [1, 2, 3] and s.history[2]["closing"]
        sliced = {"sliced": ["avg.int8"], "full": []}[reduce]  # the slice averages
        assert {c for r, c in labels if r == 3} == {"int8", *sliced}
        assert {c for r, c in labels if r < 3} == {"ternary", *[c.replace("int8", "ternary")
                                                                for c in sliced]}  # fmt: skip
        opts = codec_options("ternary", block=256, scale_dtype="fp32", stochastic=False,
                             topk_fraction=0.1)  # fmt: skip
        coarse = decode(encode(v[0].contiguous(), "ternary", **opts))[:P] - v[0]
        assert float(coarse.abs().max()) > 4 * atol  # a ternary closing would fail the bound
    finally:
        for s in sites.values():
            s.close()


def test_diloco_on_a_round_boundary_has_no_closing_sync():
    """With ``steps`` a multiple of H the last round already ends the sites on one model: no
    closing sync is added (no bytes spent)."""
    names = ["eu", "us"]
    sites = make_sites(names, ports_for(names), codec="none", method="diloco", steps=10)
    before: dict[str, torch.Tensor] = {}
    try:
        run_parallel([lambda s=s, i=i: _train_to_end(s, 10, i, before)
                      for i, s in enumerate(sites.values())])  # fmt: skip
        for s in sites.values():
            assert [h["round"] for h in s.history] == [1, 2]
            assert not any(h.get("closing") for h in s.history)
    finally:
        for s in sites.values():
            s.close()


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_padded_shard_pulls_only_the_owned_range(codec):
    """Sites whose shard reaches past P (padding) and whose padded sizes differ: each pulls
    exactly its owned [0, P), so raw phi pulls pass the length check and a partner with a
    shorter padded vector is not asked for elements it does not have."""
    ports = ports_for(["eu", "us"])
    sites = {**make_sites(["eu"], ports, codec=codec, padded=P + 7),
             **make_sites(["us"], ports, codec=codec, padded=P + 39)}  # fmt: skip
    try:
        run_parallel(
            [lambda s=s, i=i: inner_steps(s, 0, 5, i) for i, s in enumerate(sites.values())]
        )
        for s in sites.values():
            assert s.history[0]["n"] == 2 and not s.history[0]["dropped"], s.history[0]
        assert sites["eu"].history[0]["mean_crc"] == sites["us"].history[0]["mean_crc"]
    finally:
        for s in sites.values():
            s.close()


@pytest.mark.parametrize("consensus", ["weights", "lookahead", "stepped"])
def test_lookahead_consensus_ends_each_pair_on_one_phi(consensus):
    """Four sites, exact phi, gamma 1, pairs that change: after each round the members' own
    momenta part a pair again under ``weights``; under ``lookahead`` (the rounds exchange
    ``phi + c m``) and ``stepped`` (the stepped points) the last round's partners hold one phi.
    ``stepped`` publishes no delta."""
    names = ["asia", "eu", "sa", "us"]
    kw = {"alpha": 0.8, "gamma": 1.0, "consensus": consensus, "nesterov": True}
    sites = make_sites(names, ports_for(names), codec="none", outer_kw=kw)
    streams = published_streams(sites)
    try:
        run_parallel([lambda s=s, i=i: inner_steps(s, 0, 20, i)
                      for i, s in enumerate(sites.values())])  # fmt: skip
        for s in sites.values():
            assert [r["n"] for r in s.history] == [2, 2, 2, 2], s.history
            mate = sites[s.history[-1]["partner"]]
            gap = float((s.state.phi - mate.state.phi).abs().max())
            moms = float((s.state.momentum - mate.state.momentum).abs().max())
            if consensus != "weights":
                assert gap < 1e-5, gap
            else:  # c (0.64) times the momenta's difference before the round's step
                assert gap > 1e-3 and moms > 1e-3, (gap, moms)
        assert streams.count("phi") == 16
        assert streams.count("delta") == (0 if consensus == "stepped" else 16)
    finally:
        for s in sites.values():
            s.close()


@pytest.mark.parametrize("tau,phi_lattice", [(2, False), (0, True), (2, True)])
def test_stepped_consensus_overlapped_or_two_way_lattice_lands_each_pair_together(tau, phi_lattice):
    """The stepped consensus outside the sequential landing: rounds overlapped for ``tau``
    steps, and the two-way lattice (each member's stepped point in a lattice frame next to the
    partner's; each lands on the mean of the two frames' grid points plus its own point's
    coding residual, so the pair's sum stays exact). Four sites from one start, four rounds:
    every round pairs up, no delta travels (one phi frame a site and round); exact points land
    each pair on one phi (to fp32 rounding), lattice ones within the two residuals,
    ``(s_a + s_b) / 2`` per value (a grid point is within half its step); with the overlap the
    merge is
    ``mix * theta_local + (1 - mix) * phi``."""
    names = ["asia", "eu", "sa", "us"]
    kw = {"alpha": 0.8, "gamma": 1.0, "consensus": "stepped", "nesterov": True}
    sites = make_sites(names, ports_for(names), codec="none", outer_kw=kw, tau=tau, mix=0.5,
                       phi_lattice=phi_lattice, loop_kw={"merge": "mix"})  # fmt: skip
    x = sites["asia"].flat.theta.clone()
    frames: dict[tuple[str, int], bytes] = {}
    for s in sites.values():
        s.flat.theta.copy_(x)
        s.state.phi.copy_(x)
        real = s.node.publish

        def publish(r, stream, buf, *a, real=real, site=s.site, **k):
            frames[(site, r)] = bytes(memoryview(buf).cast("B")) if stream == "phi" else b""
            return real(r, stream, buf, *a, **k)

        s.node.publish = publish
    streams = published_streams(sites)
    seen: dict[str, torch.Tensor] = {}

    def run(s, i):
        g = torch.Generator().manual_seed(i)
        for step in range(1, 21 + tau):
            s.flat.theta.add_(0.01 * torch.randn(P, generator=g))
            if step == 20 + tau:
                seen[s.site] = s.flat.theta.clone()
            s.on_step_end(step)

    try:
        run_parallel([lambda s=s, i=i: run(s, i) for i, s in enumerate(sites.values())])
        for s in sites.values():
            assert [r["n"] for r in s.history] == [2, 2, 2, 2], s.history
            last = s.history[-1]
            mate = sites[last["partner"]]
            gap = (s.state.phi - mate.state.phi).abs()
            if phi_lattice:
                steps = [lattice.decode(frames[(n, last["round"])], s.state.phi) for n in
                         (s.site, mate.site)]  # fmt: skip
                bound = sum(d.steps.repeat_interleave(d.block)[:P] for d in steps) / 2
                assert bool((gap <= bound * (1 + 1e-5) + 1e-6).all()), float((gap - bound).max())
                assert float(gap.max()) > 0  # the two-way exchange's noise parts them a little
            else:
                assert float(gap.max()) < 1e-5
            if tau:
                want = 0.5 * seen[s.site] + 0.5 * s.state.phi
                torch.testing.assert_close(s.flat.theta, want, rtol=0, atol=1e-6)
        assert streams.count("phi") == 16 and streams.count("delta") == 0
    finally:
        for s in sites.values():
            s.close()


@pytest.mark.parametrize("steps", [15, 20])
def test_meet_every_two_pairs_up_to_the_last_round_and_steps_alone_between(steps):
    """``meet_every=2``, stepped, exact phi, gamma 1, H = 5: the meetings are counted back from
    the last round, so with 3 rounds rounds 1 and 3 pair up and with 4 rounds 2 and 4 (the
    partners end on one phi); the others are each site's own Nesterov step on its exact delta
    (to fp32 rounding), with nothing published."""
    names = ["asia", "eu", "sa", "us"]
    a, b = 0.8, 0.7
    kw = {"alpha": a, "beta": b, "gamma": 1.0, "consensus": "stepped", "nesterov": True}
    sites = make_sites(names, ports_for(names), codec="none", outer_kw=kw, steps=steps,
                       loop_kw={"meet_every": 2})  # fmt: skip
    streams = published_streams(sites)
    try:
        if steps == 20:  # round 1 alone: no pull, nothing published
            for i, s in enumerate(sites.values()):
                inner_steps(s, 0, 5, 50 + i)
            assert len(streams) == 0
        first = steps - 15
        run_parallel([lambda s=s, i=i: inner_steps(s, first, 5, i)
                      for i, s in enumerate(sites.values())])  # fmt: skip
        before = {n: (s.state.phi.clone(), s.state.momentum.clone(), s.flat.theta.clone())
                  for n, s in sites.items()}  # fmt: skip
        published = len(streams)
        for i, s in enumerate(sites.values()):  # no partner needed: each site alone
            inner_steps(s, first + 5, 5, 100 + i)
        assert len(streams) == published
        for i, (n, s) in enumerate(sites.items()):
            phi, m, theta = before[n]
            g = torch.Generator().manual_seed(100 + i)
            for _ in range(5):
                theta = theta + 0.01 * torch.randn(P, generator=g)
            delta = theta - phi
            m2 = m * a + b * delta
            want = phi + (m2 * a + b * delta)
            torch.testing.assert_close(s.state.momentum, m2, rtol=0, atol=1e-6)
            torch.testing.assert_close(s.state.phi, want, rtol=0, atol=1e-6)
        run_parallel([lambda s=s, i=i: inner_steps(s, first + 10, 5, 200 + i)
                      for i, s in enumerate(sites.values())])  # fmt: skip
        for s in sites.values():
            want = [2, 1, 2] if steps == 15 else [1, 2, 1, 2]
            assert [r["n"] for r in s.history] == want, s.history
            assert s.history[-2]["partner"] == ""
            mate = sites[s.history[-1]["partner"]]
            assert float((s.state.phi - mate.state.phi).abs().max()) < 1e-5
        assert streams.count("phi") == 8 and streams.count("delta") == 0
    finally:
        for s in sites.values():
            s.close()


@pytest.mark.parametrize("kw", [{"meet_every": 0}, {"meet_every": 2, "fragments": 2},
                                {"meet_first": -1}])  # fmt: skip
def test_meet_every_refuses_what_it_cannot_mean(kw):
    with pytest.raises(ValueError, match="meet_(every|first)"):
        OuterLoop(step=build_outer("noloco"), flat=FakeFlat(torch.zeros(8)), H=4, steps=8, **kw)
