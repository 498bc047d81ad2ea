"""The flat parameter space and the flat optimizers (single process)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loco.engine.base import build_optimizer
from loco.engine.flat import ALIGN, FlatLayout
from loco.engine.flat_optim import build_flat_optimizer
from tests.engine.dist_utils import tiny_gpt


def test_layout_order_hash_and_tied_weights() -> None:
    model = tiny_gpt()
    layout = FlatLayout(model)
    names = [s.name for s in layout.specs]
    assert names == [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names  # tied to wte.weight: counted once
    assert layout.numel == model.num_params()
    offs = [s.offset for s in layout.specs]
    assert offs == sorted(offs) and layout.specs[-1].end == layout.numel
    # the hash depends on the architecture only: same for another seed, different for a change
    assert FlatLayout(tiny_gpt(seed=5)).hash == layout.hash
    frozen = tiny_gpt()
    frozen.wpe.weight.requires_grad_(False)
    assert FlatLayout(frozen).hash != layout.hash
    assert FlatLayout(frozen).numel == layout.numel - frozen.wpe.weight.numel()


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_shards_cover_the_padded_vector(world: int) -> None:
    layout = FlatLayout(tiny_gpt())
    padded = layout.padded_numel(world)
    assert padded % (world * ALIGN) == 0 and 0 <= padded - layout.numel < world * ALIGN
    ranges = [layout.shard_range(r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == padded
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    owned = [layout.owned_range(r, world) for r in range(world)]
    assert owned[-1][1] == layout.numel and sum(b - a for a, b in owned) == layout.numel
    # owners() splits any span exactly along the shard boundaries
    for span in [(0, layout.numel), (5, 6), (100, 9000)]:
        pieces = layout.owners(span, world)
        assert pieces[0][1] == span[0] and pieces[-1][2] == span[1]
        assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:], strict=False))
    if world > 1:  # some parameter straddles a shard boundary
        bounds = {lo for lo, _ in ranges[1:]}
        assert any(s.offset < b < s.end for s in layout.specs for b in bounds)


def test_decay_runs_and_unflatten() -> None:
    layout = FlatLayout(tiny_gpt())
    runs = layout.decay_runs((0, layout.numel))
    assert sum(b - a for a, b, _ in runs) == layout.numel
    for s in layout.specs:
        assert any(a <= s.offset and s.end <= b and d == (len(s.shape) >= 2) for a, b, d in runs)
    flat = layout.flatten()
    views = layout.unflatten(flat)
    for s, p in zip(layout.specs, layout.params, strict=True):
        torch.testing.assert_close(views[s.name], p.detach())
    with pytest.raises(ValueError, match="elements"):
        layout.unflatten(flat[:10])


@pytest.mark.parametrize(
    "name,fused,nesterov",
    [("adamw", True, False), ("adamw", False, False), ("sgd", False, False), ("sgd", False, True)],
)
def test_flat_optimizer_matches_torch(name: str, fused: bool, nesterov: bool) -> None:
    """The flat optimizer over [0, P) equals torch's optimizer over base.param_groups.

    The foreach AdamW and SGD paths use torch's exact op sequence: equal bitwise. The fused
    AdamW kernel orders its arithmetic differently: within a few fp32 ulps (atol 1e-6).
    """
    model = tiny_gpt()
    layout = FlatLayout(model)
    flat = layout.flatten()
    kw = dict(weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ref = build_optimizer(model, name=name, lr=1e-2, **kw)
    opt = build_flat_optimizer(
        name, 0, layout.numel, layout.decay_runs((0, layout.numel)),
        betas=(0.9, 0.95), eps=1e-8, device=torch.device("cpu"), **kw,
    )  # fmt: skip
    if name == "adamw":
        opt.fused = fused
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in layout.params]
        for p, gr in zip(layout.params, grads, strict=True):
            p.grad = gr.clone()
        ref.step()
        opt.step(flat, torch.cat([gr.reshape(-1) for gr in grads]), 1e-2)
    atol = 1e-6 if fused else 0.0
    torch.testing.assert_close(flat, layout.flatten(), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "name,fused,nesterov",
    [("adamw", True, False), ("adamw", False, False), ("sgd", False, False), ("sgd", False, True)],
)
def test_flat_optimizer_in_parts_is_the_whole_step(name: str, fused: bool, nesterov: bool) -> None:
    """The offloaded step runs in parts (copies overlapped): the one-piece step, with part
    boundaries inside parameters and inside decay / no-decay runs."""
    layout = FlatLayout(tiny_gpt())
    n = layout.numel
    kw = dict(weight_decay=0.1, momentum=0.9, nesterov=nesterov, betas=(0.9, 0.95), eps=1e-8,
              device=torch.device("cpu"))  # fmt: skip
    whole = build_flat_optimizer(name, 0, n, layout.decay_runs((0, n)), **kw)
    parts = build_flat_optimizer(name, 0, n, layout.decay_runs((0, n)), **kw)
    if name == "adamw":
        whole.fused = parts.fused = fused
    a, b = layout.flatten(), layout.flatten()
    cuts = [0, 1, 777, n // 3, n // 3 + 5, n - 2, n]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(n, generator=g)
        whole.step(a, grad.clone(), 1e-2)
        parts.step_count += 1
        gp = grad.clone()
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            parts.step(b, gp, 1e-2, part=(lo, hi), count=False)
    assert whole.step_count == parts.step_count == 3
    # foreach paths: bitwise; the fused AdamW kernel rounds its SIMD body and scalar tail
    # differently, so a cut moves a few values by ulps (atol as in the test above)
    atol = 1e-6 if fused else 0.0
    torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for k in whole.state:
        torch.testing.assert_close(whole.state[k], parts.state[k], rtol=0, atol=atol)


def test_flat_optimizer_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="adamw or sgd"):
        build_flat_optimizer(
            "lion", 0, 4, [(0, 4, True)], weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
            momentum=0.9, nesterov=False, device=torch.device("cpu"),
        )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    world=st.integers(1, 9),
    a=st.integers(0, 4000),
    b=st.integers(0, 4000),
)
def test_owners_partition_any_span(sizes: list[int], world: int, a: int, b: int) -> None:
    """For any layout, world size and span, owners() tiles the span by shard."""
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n)) for n in sizes)
    layout = FlatLayout(model)
    lo, hi = sorted((min(a, layout.numel), min(b, layout.numel)))
    pieces = layout.owners((lo, hi), world)
    assert sum(t - s for _, s, t in pieces) == hi - lo
    for r, s, t in pieces:
        rs, rt = layout.shard_range(r, world)
        assert rs <= s < t <= rt
    runs = layout.decay_runs((lo, hi))
    assert sum(t - s for s, t, _ in runs) == hi - lo


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    world=st.integers(1, 9),
    a=st.integers(0, 4000),
    b=st.integers(0, 4000),
)
def test_one_ownership_rule_for_engine_and_gossip(
    sizes: list[int], world: int, a: int, b: int
) -> None:
    """The engine's shards and gossip's rank ranges are one rule (``loco.ranges``).

    ``loco.build`` gives the gossip layer ``flat_size = padded_numel(world)``; on that size
    ``rank_range`` must give exactly ``FlatLayout.shard_range`` and ``owners`` the same pieces, or
    a partner's rank table would not line up with its engine's shards.
    """
    from loco import ranges
    from loco.gossip import owners, rank_range
    from loco.gossip import ranges as gossip_ranges

    assert gossip_ranges.rank_range is ranges.rank_range is rank_range
    assert gossip_ranges.owners is ranges.owners is owners
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n)) for n in sizes)
    layout = FlatLayout(model)
    padded = layout.padded_numel(world)
    size = padded // world
    for r in range(world):
        assert layout.shard_range(r, world) == rank_range(padded, world, r)
        assert rank_range(padded, world, r) == (r * size, (r + 1) * size)
    lo, hi = sorted((min(a, padded), min(b, padded)))
    brute = []
    for r in range(world):
        rlo, rhi = r * size, (r + 1) * size
        if max(lo, rlo) < min(hi, rhi):
            brute.append((r, max(lo, rlo), min(hi, rhi)))
    assert layout.owners((lo, hi), world) == owners(padded, world, lo, hi) == brute


@settings(max_examples=200, deadline=None)
@given(
    flat_size=st.integers(0, 5000),
    nproc=st.integers(1, 17),
    a=st.integers(0, 6000),
    b=st.integers(0, 6000),
)
def test_owners_matches_every_rank_scan(flat_size: int, nproc: int, a: int, b: int) -> None:
    """``loco.ranges.owners`` (which skips ranks before ``lo``) equals a scan of every rank,
    also for sizes that are not a multiple of the rank count (uneven ranges)."""
    from loco.ranges import owners, rank_range

    lo, hi = min(a, b), max(a, b)
    scan = []
    for r in range(nproc):
        rlo, rhi = rank_range(flat_size, nproc, r)
        if max(lo, rlo) < min(hi, rhi):
            scan.append((r, max(lo, rlo), min(hi, rhi)))
    assert owners(flat_size, nproc, lo, hi) == scan
