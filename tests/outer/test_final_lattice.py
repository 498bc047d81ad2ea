"""The final average in lattice frames (``outer.final_lattice``) on loopback: real GossipNodes,
several sites as threads. Every site ends on one model, the mean of the sites' grid points; a
block that fails at a receiver is rebuilt from the sender's exact weights, never guessed; a
peer's malformed final frame leaves it out with a strike."""

from __future__ import annotations

import pytest
import torch

from loco.gossip import GossipNode
from loco.outer import lattice
from loco.outer.final import FINAL_RAW_STREAM, FINAL_STREAM

from .test_loop import LAYOUT, RUN, P, make_sites, ports_for, run_parallel


def _train_to_end(loop, steps, seed, before_last, jump=0.0):
    """Inner steps 1..steps; ``before_last[site]`` = theta right before the last hook;
    ``jump`` is added to every weight at the last step."""
    g = torch.Generator().manual_seed(seed)
    for s in range(1, steps + 1):
        loop.flat.theta.add_(0.01 * torch.randn(P, generator=g) + (jump if s == steps else 0.0))
        if s == steps:
            before_last[loop.site] = loop.flat.theta.clone()
        loop.on_step_end(s)
    loop.finish()


def _grid(theta: torch.Tensor, momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's share of the mean (its 8-bit frame's grid points) and its steps per value."""
    _, grid = lattice.encode(theta, momentum, block=256, bits=8)
    steps = lattice.steps_for(theta, momentum, 256, bits=8).repeat_interleave(256)[:P]
    return grid, steps


def _run(names, far: str | None):
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
                                                     5.0 if s.site == far else 0.0)
                      for i, s in enumerate(sites.values())])  # fmt: skip
    finally:
        for s in sites.values():
            s.close()
    return sites, before


@pytest.mark.parametrize("far", [None, "sa"])
def test_lattice_final_average_ends_every_site_on_the_mean_of_grid_points(far):
    """Close sites: every block decodes, no exact weights pulled, about 1.02 bytes per value a
    peer. A site far from the others (+5 on every weight at the last step, far outside the
    momentum rule's window): the blocks that fail are rebuilt from the exact weights, the far
    site's at the others and the others' at it. Either way every site ends on the same bits:
    the mean in site order of every site's grid points, within half the widest step of the
    exact mean."""
    names = ["asia", "eu", "sa", "us"]
    sites, before = _run(names, far)
    shares = {n: _grid(before[n], sites[n].state.momentum) for n in names}
    want = torch.stack([shares[n][0] for n in sorted(names)]).mean(0)
    exact = torch.stack([before[n] for n in sorted(names)]).mean(0)
    widest = torch.stack([shares[n][1] for n in names]).amax(0)
    assert float((want - exact).abs().sub(widest / 2).max()) <= 1e-6
    for s in sites.values():
        assert torch.equal(s.flat.theta, want), s.site
        assert torch.equal(s.state.phi, want), s.site
        f = s.final
        assert f["n"] == 4 and f["dropped"] == "" and f["final_codec"] == "lattice"
        frames = 3 * lattice.frame_bytes(P, 256, 8)
        if far is None:
            assert f["final_raw_pulls"] == 0
            # three peers' frames plus the pulls' framing, far below three fp32 copies
            assert frames <= f["bytes_recv"] < frames + 3 * 1024 < 3 * 4 * P
        elif s.site == far:
            assert f["final_raw_pulls"] == 3  # every peer is far from it
            assert f["bytes_recv"] >= frames + 3 * 4 * P
        else:
            assert f["final_raw_pulls"] == 1  # only the far site's exact weights
            assert frames + 4 * P <= f["bytes_recv"] < frames + 4 * P + 4 * 1024
    assert len({s.final["mean_crc"] for s in sites.values()}) == 1


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
