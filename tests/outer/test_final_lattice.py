"""The final average in lattice frames (``outer.final_lattice``) on loopback: real GossipNodes,
several sites as threads. Every site ends on one model, the mean of the sites' grid points; a
block that fails at a receiver is rebuilt from the sender's exact weights, never guessed; a
peer's malformed final frame leaves it out with a strike."""

from __future__ import annotations

import pytest
import torch

from loco.gossip import GossipNode
from loco.outer import lattice, phi_sketch
from loco.outer.final import FINAL_RAW_STREAM, FINAL_STREAM, failed_spans

from .test_loop import LAYOUT, RUN, P, make_sites, ports_for, run_parallel


def _train_to_end(loop, steps, seed, before_last, jump=0.0, span=P):
    """Inner steps 1..steps; ``before_last[site]`` = theta right before the last hook;
    ``jump`` is added to the first ``span`` weights at the last step."""
    g = torch.Generator().manual_seed(seed)
    for s in range(1, steps + 1):
        loop.flat.theta.add_(0.01 * torch.randn(P, generator=g))
        if s == steps:
            loop.flat.theta[:span].add_(jump)
        if s == steps:
            before_last[loop.site] = loop.flat.theta.clone()
        loop.on_step_end(s)
    loop.finish()


def _sketch(theta: torch.Tensor) -> torch.Tensor:
    return phi_sketch.sketch(theta, phi_sketch.signs(0, P), 256)


def _grid(theta: torch.Tensor, momentum: torch.Tensor,
          peers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A site's share of the mean (its 8-bit frame's grid points) and its steps per value: the
    momentum rule, widened to the peers' weights (``peers``) as their sketches show them."""
    sent = [phi_sketch.decode(phi_sketch.frame(_sketch(p), P, 256), P)[::256] for p in peers]
    steps = phi_sketch.final_steps(theta, momentum, _sketch(theta), sent, 256)  # as they arrive
    _, grid = lattice.encode(theta, momentum, block=256, bits=8, steps=steps)
    return grid, steps.repeat_interleave(256)[:P]


def _run(names, far: str | None, jump: float = 0.0, span: int = P):
    steps = 12  # rounds at 5 and 10, two more inner steps before the final average
    sites = make_sites(names, ports_for(names), steps=steps, final_average=True,
                       final_lattice=True)  # fmt: skip
    x = sites[names[0]].flat.theta.clone()
    for s in sites.values():  # the sites differ by their inner steps and partners
        s.flat.theta.copy_(x)
        s.state.phi.copy_(x)
    before: dict[str, torch.Tensor] = {}
    try:
        run_parallel([lambda s=s, i=i: _train_to_end(s, steps, i, before,
                                                     jump if s.site == far else 0.0, span)
                      for i, s in enumerate(sites.values())])  # fmt: skip
    finally:
        for s in sites.values():
            s.close()
    return sites, before


@pytest.mark.parametrize("far,jump,span", [(None, 0.0, P), ("sa", 2.0, P), ("sa", 8.0, P),
                                           ("sa", 8.0, 600)])  # fmt: skip
def test_lattice_final_average_ends_every_site_on_the_mean_of_grid_points(far, jump, span):
    """Close sites: every block decodes, no exact weights pulled, about 1.02 bytes per value a
    peer (and a sketch). A site far from the others (``jump`` on every weight at the last step,
    outside the momentum rule's window): at +2 the peers' sketches widen every frame's window
    to cover it, and still no exact weights are pulled; at +8, past twice the others' largest
    weights, the far site's frame still decodes everywhere (its window covers its own weights'
    scale), while the others' frames fail at the far site, which rebuilds them from their exact
    weights; far on its first 600 weights only, it pulls the exact weights of those blocks
    (0-2: 768 values) alone. Either way every site ends on the same bits: the mean in site order of every
    site's grid points, within half the widest step of the exact mean."""
    names = ["asia", "eu", "sa", "us"]
    sites, before = _run(names, far, jump, span)
    if far is not None:  # the momentum rule alone would not cover the jump
        rule = max(float(lattice.momentum_window(s.state.momentum, 256).max())
                   for s in sites.values())  # fmt: skip
        assert jump > 1.5 * rule, (jump, rule)
    shares = {n: _grid(before[n], sites[n].state.momentum,
                       [before[m] for m in names if m != n]) for n in names}  # fmt: skip
    want = torch.stack([shares[n][0] for n in sorted(names)]).mean(0)
    exact = torch.stack([before[n] for n in sorted(names)]).mean(0)
    widest = torch.stack([shares[n][1] for n in names]).amax(0)
    assert float((want - exact).abs().sub(widest / 2).max()) <= 1e-6
    frames = 3 * (lattice.frame_bytes(P, 256, 8) + phi_sketch.frame_bytes(P, 256))
    for s in sites.values():
        assert torch.equal(s.flat.theta, want), s.site
        assert torch.equal(s.state.phi, want), s.site
        f = s.final
        assert f["n"] == 4 and f["dropped"] == "" and f["final_codec"] == "lattice"
        if jump < 5:
            assert f["final_raw_pulls"] == 0
            # three peers' frames and sketches plus the pulls' framing, far below fp32 copies
            assert frames <= f["bytes_recv"] < frames + 6 * 1024 < 3 * 4 * P
        elif s.site == far:
            assert f["final_raw_pulls"] == 3  # every peer's frame is too narrow for it
            failed = min(-(-span // 256) * 256, P)  # the failed blocks' values
            assert frames + 3 * 4 * failed <= f["bytes_recv"] < frames + 3 * 4 * failed + 8 * 1024
        else:
            assert f["final_raw_pulls"] == 0
            assert frames <= f["bytes_recv"] < frames + 6 * 1024
    assert len({s.final["mean_crc"] for s in sites.values()}) == 1


def test_final_steps_widen_the_momentum_rule_to_the_peers_as_far_as_the_cap():
    """``final_steps``: the momentum rule where the peers' sketches show them within it; wider
    where they are farther (the window then covers the farthest peer's values, a few outliers
    of 17x the rms difference included); never past ``FINAL_CAP`` times the block's largest
    weight, whatever a peer's sketch claims."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g)
    m = torch.randn(4096, generator=g) * 0.01
    sk = _sketch_of(x)
    rule = lattice.steps_for(x, m, 256, bits=8)
    near = x + 0.001 * torch.randn(4096, generator=g)
    assert torch.equal(phi_sketch.final_steps(x, m, sk, [_sketch_of(near)], 256), rule)
    far = x + 0.8 * torch.randn(4096, generator=g)
    steps = phi_sketch.final_steps(x, m, sk, [_sketch_of(near), _sketch_of(far)], 256)
    assert bool((steps >= rule).all()) and bool((steps > 2 * rule).all())
    frame, _ = lattice.encode(x, m, block=256, bits=8, steps=steps)
    assert lattice.decode(frame, far).failed == 0  # every block decodes next to the far peer
    assert lattice.decode(lattice.encode(x, m, block=256, bits=8)[0], far).failed > 0
    rare = x + 0.01 * torch.randn(4096, generator=g)  # a few values of one block 17x the rms
    rare[3 * 256 : 3 * 256 + 4] += 0.17
    small = m * 0.1  # the momentum rule alone: a window of ~0.06
    steps = phi_sketch.final_steps(x, small, sk, [_sketch_of(rare)], 256)
    assert float(lattice.momentum_window(small, 256).max()) < 0.17
    frame, _ = lattice.encode(x, small, block=256, bits=8, steps=steps)
    assert lattice.decode(frame, rare).failed == 0
    hostile = torch.full((16,), 1e30)
    wide = phi_sketch.final_steps(x, m, sk, [hostile], 256)
    cap = phi_sketch.FINAL_CAP * x.reshape(16, 256).abs().amax(1) / 127
    assert bool((wide <= cap * 1.01).all())


def _sketch_of(x: torch.Tensor) -> torch.Tensor:
    return phi_sketch.sketch(x, phi_sketch.signs(0, x.numel()), 256)


def test_grid_points_are_the_frames_own_values():
    """What a receiver computes from a sender's exact weights and its frame's steps is the
    sender's own decoded value, bit for bit (the fallback of a failed block)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * 5
    m = torch.randn(1000, generator=g) * 0.01
    frame, own = lattice.encode(x, m, block=256, bits=8)
    steps = lattice.steps_for(x, m, 256, bits=8).repeat_interleave(256)[:1000]
    assert torch.equal(lattice.grid_points(x, steps), own)
    far = lattice.decode(frame, x + 40.0)  # every block outside the window
    assert far.failed == far.blocks == 4


def _hostile(frame: bytes | None, raw):
    """A site ``eu`` averages with ``us``, a bare node that serves ``frame`` as its final
    lattice frame (and ``raw`` as its exact weights)."""
    ports = ports_for(["eu", "us"])
    (eu,) = make_sites(["eu"], ports, steps=12, final_average=True, final_lattice=True,
                       pull_timeout_s=2.0).values()  # fmt: skip
    us = GossipNode(
        site="us", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
        listen=f"127.0.0.1:{ports['us']}", peers={"eu": f"127.0.0.1:{ports['eu']}"},
        insecure=True, heartbeat=False, seed=0, pull_timeout_s=2.0, hello_timeout_s=1.0,
        max_retries=1, backoff_s=0.05,
    ).start()  # fmt: skip
    t = eu.schedule.final_round(12)
    us.publish(t, FINAL_STREAM, frame, codec="lattice")
    if raw is not None:
        us.publish(t, FINAL_RAW_STREAM, raw, codec="raw")
    try:
        eu.on_step_end(12)  # straight to the last step: no round before (steps 5, 10 skipped)
        return eu
    finally:
        eu.close()
        us.close()


def _theta_far_away() -> torch.Tensor:
    return torch.full((P,), 1000.0)


@pytest.mark.parametrize("kind", ["skip", "rotated", "nan_raw"])
def test_a_hostile_final_frame_leaves_the_peer_out(kind):
    """A frame without values or over rotated blocks is refused before anything is applied;
    exact weights served for a failed block that are not finite are refused too. The peer is
    left out and the site averages alone: its own grid points."""
    x = _theta_far_away()
    m = torch.zeros(P)
    if kind == "skip":
        frame, raw = lattice.skip_frame(P), None
    elif kind == "rotated":
        frame, raw = lattice.encode(x, m, block=256, bits=8, rotate=True)[0], None
    else:  # a fine frame far from eu (every block fails), then NaN exact weights
        frame = lattice.encode(x, m, block=256, bits=8)[0]
        raw = torch.full((P,), float("nan")).numpy()
    eu = _hostile(frame, raw)
    f = eu.final
    assert f["n"] == 1 and f["dropped"].startswith("us:"), f
    assert torch.isfinite(eu.flat.theta).all()
    assert float(eu.flat.theta.abs().max()) < 100  # nothing of us's 1000s applied


def test_failed_spans_cover_every_failed_value_in_at_most_so_many_pulls():
    """The runs of failed values, joined over the smallest gaps first until at most ``most``
    remain: every failed value is covered, the widest gaps stay out, one span at most for
    ``most=1``, none where nothing failed."""
    bad = torch.zeros(40, dtype=torch.bool)
    for a, b in ((2, 4), (5, 6), (10, 12), (19, 20), (30, 39)):
        bad[a:b] = True
    assert failed_spans(bad, 16) == [(2, 4), (5, 6), (10, 12), (19, 20), (30, 39)]
    assert failed_spans(bad, 3) == [(2, 12), (19, 20), (30, 39)]  # gaps 1 and 4 joined
    assert failed_spans(bad, 1) == [(2, 39)]
    assert failed_spans(torch.zeros(9, dtype=torch.bool), 4) == []
    g = torch.Generator().manual_seed(0)
    many = torch.rand(100_000, generator=g) < 0.01
    spans = failed_spans(many, 16)
    assert len(spans) == 16
    covered = torch.zeros_like(many)
    for a, b in spans:
        covered[a:b] = True
    assert bool(covered[many].all())
