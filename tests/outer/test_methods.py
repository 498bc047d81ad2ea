"""Outer steps against a small NumPy reference of the NoLoCo spec, and the spec's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loco.outer import DiLoCo, Local, NoLoCo, OuterState, build_outer

N = 257


def ref_noloco(phi, m, deltas, phis, a, b, g):
    m = a * m + b * np.mean(deltas, 0) - g * (phi - np.mean(phis, 0))
    return phi + m, m


def ref_noloco_general(phi, m, deltas, phis, a, b, g, consensus, nesterov):
    gap = phi - np.mean(phis, 0)
    grad = b * np.mean(deltas, 0) - (g * gap if consensus == "momentum" else 0)
    m = a * m + grad
    phi = phi + (grad + a * m if nesterov else m) - (g * gap if consensus == "weights" else 0)
    return phi, m


def ref_diloco_rounds(phi, rounds, lr, mu):
    """torch.optim.SGD(nesterov=True) semantics, one step per round on g = -mean(delta)."""
    buf = None
    for deltas in rounds:
        g = -np.mean(deltas, 0)
        buf = g.copy() if buf is None else mu * buf + g
        phi = phi - lr * (g + mu * buf)
    return phi


def rand(rng, k=1):
    return [rng.standard_normal(N).astype(np.float32) for _ in range(k)]


@pytest.mark.parametrize("members", [1, 2, 3])
def test_noloco_matches_numpy_over_rounds(members):
    rng = np.random.default_rng(members)
    phi0 = rand(rng)[0]
    st = OuterState.start(torch.from_numpy(phi0))
    theta = torch.zeros(N)
    ref_phi, ref_m = phi0.astype(np.float64), np.zeros(N)
    step = NoLoCo(alpha=0.5, beta=0.7, gamma=0.6)
    for _ in range(4):
        deltas = rand(rng, members)
        phis = [st.phi.numpy().copy()] + [p * 0.1 + st.phi.numpy() for p in rand(rng, members - 1)]
        step.apply(
            theta, st, [torch.from_numpy(d) for d in deltas], [torch.from_numpy(p) for p in phis]
        )
        ref_phi, ref_m = ref_noloco(ref_phi, ref_m, deltas, phis, 0.5, 0.7, 0.6)
        # fp32 arithmetic on O(1) values, 4 rounds: errors ~1e-6; 1e-5 leaves margin
        np.testing.assert_allclose(st.phi.numpy(), ref_phi, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.momentum.numpy(), ref_m, rtol=1e-5, atol=1e-5)
        assert torch.equal(theta, st.phi)


@pytest.mark.parametrize("consensus", ["momentum", "weights"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_noloco_variants_match_numpy(consensus, nesterov):
    rng = np.random.default_rng(11)
    phi0 = rand(rng)[0]
    st = OuterState.start(torch.from_numpy(phi0))
    ref_phi, ref_m = phi0.astype(np.float64), np.zeros(N)
    step = build_outer("noloco", alpha=0.9, beta=0.7, gamma=0.8, consensus=consensus,
                       nesterov=nesterov)  # fmt: skip
    for _ in range(4):
        deltas = rand(rng, 2)
        phis = [st.phi.numpy().copy(), st.phi.numpy() + 0.1 * rand(rng)[0]]
        step.apply(torch.zeros(N), st, [torch.from_numpy(d) for d in deltas],
                   [torch.from_numpy(p) for p in phis])  # fmt: skip
        ref_phi, ref_m = ref_noloco_general(ref_phi, ref_m, deltas, phis, 0.9, 0.7, 0.8,
                                            consensus, nesterov)  # fmt: skip
        # fp32 on O(1) values, momentum sums up to ~1/(1-0.9) terms: ~1e-5
        np.testing.assert_allclose(st.phi.numpy(), ref_phi, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(st.momentum.numpy(), ref_m, rtol=1e-4, atol=1e-4)


def test_noloco_nesterov_with_one_group_is_diloco():
    """Equal phis (one group of every site): the gamma term is zero in either form, and the
    Nesterov NoLoCo step with alpha = mu, beta = lr is DiLoCo's step."""
    rng = np.random.default_rng(12)
    phi0 = rand(rng)[0]
    rounds = [rand(rng, 4) for _ in range(4)]
    dl, nl = OuterState.start(torch.from_numpy(phi0)), OuterState.start(torch.from_numpy(phi0))
    for deltas in rounds:
        ds = [torch.from_numpy(d) for d in deltas]
        DiLoCo(lr=0.7, momentum=0.9).apply(torch.zeros(N), dl, ds, [dl.phi.clone()] * 4)
        NoLoCo(alpha=0.9, beta=0.7, gamma=1.0, consensus="weights", nesterov=True).apply(
            torch.zeros(N), nl, ds, [nl.phi.clone()] * 4
        )
    torch.testing.assert_close(nl.phi, dl.phi, rtol=1e-5, atol=1e-5)


def test_identical_members_give_the_heavy_ball_step():
    rng = np.random.default_rng(0)
    phi, delta = rand(rng, 2)
    a = OuterState.start(torch.from_numpy(phi))
    b = OuterState.start(torch.from_numpy(phi))
    d = torch.from_numpy(delta)
    NoLoCo().apply(torch.zeros(N), a, [d, d.clone()], [a.phi.clone(), a.phi.clone()])
    Local().apply(torch.zeros(N), b, [d], [b.phi.clone()])
    assert torch.equal(a.phi, b.phi)  # the gamma term is exactly zero
    np.testing.assert_allclose(a.phi.numpy(), phi + 0.7 * delta, rtol=1e-6, atol=1e-6)


def test_pair_members_compute_the_same_means_and_converge():
    rng = np.random.default_rng(3)
    p1, p2, d1, d2 = rand(rng, 4)
    s1, s2 = OuterState.start(torch.from_numpy(p1)), OuterState.start(torch.from_numpy(p2))
    gap0 = float((s1.phi - s2.phi).norm())
    deltas = [torch.from_numpy(d1), torch.from_numpy(d2)]
    phis = [s1.phi.clone(), s2.phi.clone()]
    NoLoCo().apply(torch.zeros(N), s1, deltas, phis)
    NoLoCo().apply(torch.zeros(N), s2, deltas[::-1], phis[::-1])
    # same mean delta in both; each moves gamma/2 of the gap toward the other: gap * (1 - gamma)
    np.testing.assert_allclose(
        (s1.phi - s2.phi).numpy(), (1 - 0.7) * (p1 - p2), rtol=1e-5, atol=1e-5
    )
    assert float((s1.phi - s2.phi).norm()) < gap0


def test_diloco_matches_torch_sgd_semantics():
    rng = np.random.default_rng(5)
    phi0 = rand(rng)[0]
    st = OuterState.start(torch.from_numpy(phi0))
    rounds = [rand(rng, 3) for _ in range(3)]
    step = DiLoCo(lr=0.7, momentum=0.9)
    for deltas in rounds:
        step.apply(torch.zeros(N), st, [torch.from_numpy(d) for d in deltas], [st.phi.clone()] * 3)
    np.testing.assert_allclose(
        st.phi.numpy(), ref_diloco_rounds(phi0, rounds, 0.7, 0.9), rtol=1e-5, atol=1e-5
    )
    # and the same as torch's own optimizer
    p = torch.nn.Parameter(torch.from_numpy(phi0.copy()))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for deltas in rounds:
        p.grad = -torch.from_numpy(np.mean(deltas, 0))
        opt.step()
    torch.testing.assert_close(st.phi, p.detach(), rtol=1e-6, atol=1e-6)


def test_diloco_heavy_ball_matches_torch_sgd_and_noloco_with_one_group():
    rng = np.random.default_rng(6)
    phi0 = rand(rng)[0]
    rounds = [rand(rng, 4) for _ in range(4)]
    st = OuterState.start(torch.from_numpy(phi0))
    step = build_outer("diloco", lr=1.4, momentum=0.5, nesterov=False)
    p = torch.nn.Parameter(torch.from_numpy(phi0.copy()))
    opt = torch.optim.SGD([p], lr=1.4, momentum=0.5, nesterov=False)
    # NoLoCo with every site in the group (equal phis) is the same heavy ball: m = 1.4 * buf
    nl = OuterState.start(torch.from_numpy(phi0))
    for deltas in rounds:
        ds = [torch.from_numpy(d) for d in deltas]
        step.apply(torch.zeros(N), st, ds, [st.phi.clone()] * 4)
        p.grad = -torch.stack(ds).mean(0)
        opt.step()
        NoLoCo(alpha=0.5, beta=1.4, gamma=0.7).apply(torch.zeros(N), nl, ds, [nl.phi.clone()] * 4)
    # fp32, 4 rounds of O(1) values: ~1e-6
    torch.testing.assert_close(st.phi, p.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.phi, nl.phi, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["nan", "inf", "short"])
def test_bad_member_input_leaves_state_untouched(bad):
    rng = np.random.default_rng(1)
    st = OuterState.start(torch.from_numpy(rand(rng)[0]))
    st.momentum += 0.5
    before = (st.phi.clone(), st.momentum.clone())
    theta = torch.full((N,), 3.0)
    d = torch.from_numpy(rand(rng)[0])
    other = d.clone()
    if bad == "nan":
        other[7] = float("nan")
    elif bad == "inf":
        other[0] = float("inf")
    else:
        other = other[:-1]
    with pytest.raises(ValueError):
        NoLoCo().apply(theta, st, [d, other], [st.phi.clone(), st.phi.clone()])
    assert torch.equal(st.phi, before[0]) and torch.equal(st.momentum, before[1])
    assert bool((theta == 3.0).all()) and st.rounds == 0


def test_build_outer_by_name():
    assert isinstance(build_outer("noloco", alpha=0.1, beta=0.2, gamma=0.3, lr=9.0), NoLoCo)
    assert isinstance(build_outer("diloco", lr=0.5, momentum=0.8, alpha=1.0), DiLoCo)
    with pytest.raises(ValueError, match="momentum, weights, lookahead"):
        build_outer("noloco", consensus="phi")
    with pytest.raises(ValueError, match="choose noloco"):
        build_outer("fedavg")


@pytest.mark.parametrize("consensus", ["weights", "momentum"])
def test_lossy_phi_moves_no_pairs_mean(consensus):
    """The gap comes from decoded values only: with phi decoded with errors on both sides, the
    pair's mean phi moves exactly as with exact phi (the errors only part the two members)."""
    g = torch.Generator().manual_seed(3)
    n = 1000
    phi = [torch.randn(n, generator=g), torch.randn(n, generator=g)]
    deltas = [torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.1]
    err = [torch.randn(n, generator=g) * 0.01, torch.randn(n, generator=g) * 0.01]
    decoded = [phi[i] + err[i] for i in range(2)]

    def run(phis_seen, owns):
        out = []
        for i in range(2):
            st = OuterState.start(phi[i])
            step = NoLoCo(alpha=0.9, beta=0.7, gamma=1.0, consensus=consensus, nesterov=True)
            step.apply(torch.zeros(n), st, deltas, phis_seen, own=owns[i])
            out.append(st.phi)
        return out

    exact = run(phi, [None, None])
    lossy = run(decoded, decoded)
    torch.testing.assert_close((lossy[0] + lossy[1]) / 2, (exact[0] + exact[1]) / 2,
                               rtol=0, atol=1e-5)  # fmt: skip
    assert not torch.allclose(lossy[0], exact[0], atol=1e-4)  # the members themselves move


@pytest.mark.parametrize("nesterov", [True, False])
def test_lookahead_consensus_ends_a_pair_on_one_phi(nesterov):
    """Members with different momenta, gamma 1: under ``weights`` their own momenta part them
    again after the pull (by c times the momenta's difference); under ``lookahead`` they
    average ``phi + c m`` and end on one phi. The group's mean of phi moves the same in both
    forms (the pulls sum to zero over the group)."""
    g = torch.Generator().manual_seed(0)
    n = 1000
    phis = [torch.randn(n, generator=g) for _ in range(2)]
    moms = [torch.randn(n, generator=g) * 0.1 for _ in range(2)]
    deltas = [torch.randn(n, generator=g) * 0.01 for _ in range(2)]
    ends = {}
    for consensus in ("weights", "lookahead"):
        step = NoLoCo(alpha=0.8, beta=0.7, gamma=1.0, consensus=consensus, nesterov=nesterov)
        states = [
            OuterState(phi=p.clone(), momentum=m.clone()) for p, m in zip(phis, moms, strict=True)
        ]
        points = [step.consensus_point(s, d).clone() for s, d in zip(states, deltas, strict=True)]
        for s, own in zip(states, points, strict=True):
            step.apply(torch.empty(n), s, deltas, points, own=own)
        ends[consensus] = [s.phi for s in states]
    c = 0.8**2 if nesterov else 0.8
    parted = ends["weights"][0] - ends["weights"][1]
    torch.testing.assert_close(parted, c * (moms[0] - moms[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ends["lookahead"][0], ends["lookahead"][1], rtol=0, atol=1e-6)
    mean = {k: (v[0] + v[1]) / 2 for k, v in ends.items()}
    torch.testing.assert_close(mean["lookahead"], mean["weights"], rtol=0, atol=1e-6)
    # the other forms exchange phi itself
    s = OuterState(phi=phis[0].clone(), momentum=moms[0].clone())
    assert NoLoCo(consensus="weights").consensus_point(s, deltas[0]) is s.phi


@pytest.mark.parametrize("nesterov", [True, False])
def test_stepped_consensus_steps_each_member_on_its_own_delta(nesterov):
    """``stepped``: each member's momentum takes its own delta alone, the members average
    their stepped points and, with gamma 1, end on one phi; no delta travels. Over the group
    the means of phi and of the momenta move exactly as under ``weights`` with every delta
    exchanged (the same optimizer step on the group's mean delta). Alone (n = 1) a member takes
    its own step."""
    g = torch.Generator().manual_seed(1)
    n = 1000
    phis = [torch.randn(n, generator=g) for _ in range(2)]
    moms = [torch.randn(n, generator=g) * 0.1 for _ in range(2)]
    deltas = [torch.randn(n, generator=g) * 0.01 for _ in range(2)]
    a, b = 0.8, 0.7

    def states():
        return [
            OuterState(phi=p.clone(), momentum=m.clone()) for p, m in zip(phis, moms, strict=True)
        ]

    stepped = NoLoCo(alpha=a, beta=b, gamma=1.0, consensus="stepped", nesterov=nesterov)
    weights = NoLoCo(alpha=a, beta=b, gamma=1.0, consensus="weights", nesterov=nesterov)
    assert not stepped.sends_delta and weights.sends_delta
    ours, theirs = states(), states()
    points = [stepped.consensus_point(s, d) for s, d in zip(ours, deltas, strict=True)]
    for i, s in enumerate(ours):
        own_m = a * moms[i] + b * deltas[i]
        torch.testing.assert_close(stepped.window_momentum(s, deltas[i]), own_m, rtol=0, atol=1e-7)
        theta = torch.empty(n)
        stepped.apply(theta, s, [deltas[i]], points, own=points[i])
        torch.testing.assert_close(s.momentum, own_m, rtol=0, atol=1e-7)
        assert torch.equal(theta, s.phi)
    torch.testing.assert_close(ours[0].phi, ours[1].phi, rtol=0, atol=1e-6)
    for s in theirs:
        weights.apply(torch.empty(n), s, deltas, [t.phi.clone() for t in states()])
    for field in ("phi", "momentum"):
        mine = (getattr(ours[0], field) + getattr(ours[1], field)) / 2
        ref = (getattr(theirs[0], field) + getattr(theirs[1], field)) / 2
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    alone = states()[0]
    point = stepped.consensus_point(alone, deltas[0])
    stepped.apply(torch.empty(n), alone, [deltas[0]], [point], own=point)
    torch.testing.assert_close(alone.phi, point, rtol=0, atol=0)
    assert weights.window_momentum(alone, deltas[0]) is alone.momentum
