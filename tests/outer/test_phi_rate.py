"""The coded-phi toy (scripts/experiments/phi_rate.py) behind docs/outer.md's rate tables: exact
codes reproduce exact phi's distance, an ideal code at 3 bits stays within a few percent of it,
pulling half of the blocks per round leaves the sites much farther apart, and the sequential
exchange (one coded phi per pair, one plain offset, one landing point) stays within 1.2x where
the two-way exchange cannot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "phi_rate", ROOT / "scripts" / "experiments" / "phi_rate.py"
)
phi_rate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(phi_rate)  # type: ignore[union-attr]

SMALL = {"rounds": 120, "dim": 1024}


def test_lattice_decodes_exactly_inside_its_window():
    """Within +-half a window of the receiver's phi every value lands on the sender's grid
    point; one value past it fails its block and only that block."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(512, generator=g)
    phi = ref + 0.1 * torch.randn(512, generator=g)
    spread = torch.full((2,), 0.5)  # window: margin 2 x 0.5 each side, 3 bits: step 1/3
    got, ok = phi_rate.lattice(3, 2.0)(phi, ref, spread, 0)
    step = 2.0 * 0.5 / 3
    assert ok.all()
    assert (got - phi).abs().max() <= step / 2 + 1e-6
    phi[300] = ref[300] + 5.0  # 15 steps away, past the 4-step half window
    _, ok = phi_rate.lattice(3, 2.0)(phi, ref, spread, 0)
    assert ok.tolist() == [True, False]


def test_rate_table_orders_codes_as_documented():
    ref, failed = phi_rate.run(phi_rate.exact, **SMALL)
    assert ref > 0 and failed == 0
    # 3 bits at the bound add noise of 2^-6 of the difference's variance: a few percent
    near, _ = phi_rate.run(phi_rate.bound(3.0), **SMALL)
    assert ref <= near * 1.02 and near < 1.1 * ref, (near, ref)
    # half of the blocks unpulled each round drift for ~2 rounds on average: far more
    half, failed = phi_rate.run(phi_rate.subsample(0.5), **SMALL)
    assert half > 1.5 * ref and 0.3 < failed < 0.7, (half, ref, failed)


def test_sequential_landing_with_exact_codes_is_the_exact_exchange():
    """Leader's phi and follower's offset both exact: both land on the pair's mean, which is
    what the two-way exchange with exact phi does, so the distance is the same."""
    ref, _ = phi_rate.run(phi_rate.exact, **SMALL)
    seq, failed = phi_rate.run_sequential(phi_rate.exact, lambda x: x.clone(), feedback=False,
                                          **SMALL)  # fmt: skip
    assert failed == 0
    assert abs(seq - ref) <= 1e-6 * ref, (seq, ref)


def test_sequential_landing_beats_the_two_way_bound_and_feedback_helps():
    """docs/outer.md: at ~0.18-0.2 B/value an ideal code is 1.07-1.11x exact phi's distance in
    the sequential exchange and 1.28x in the two-way one; feeding the landing's miss back
    lowers the distance at every rate."""
    ref, _ = phi_rate.run(phi_rate.exact, **SMALL)
    two_way, _ = phi_rate.run(phi_rate.bound(1.4), **SMALL)
    assert two_way > 1.2 * ref, (two_way, ref)
    for rate in (1.3, 1.0):
        code = (phi_rate.bound(rate), phi_rate.plain_bound(rate))
        plain_d, _ = phi_rate.run_sequential(*code, feedback=False, **SMALL)
        code = (phi_rate.bound(rate), phi_rate.plain_bound(rate))
        fed, _ = phi_rate.run_sequential(*code, feedback=True, **SMALL)
        assert fed < plain_d < 1.2 * ref, (rate, fed, plain_d, ref)


def test_plain_codes_keep_sign_and_block_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, generator=g)
    s = phi_rate.plain("sign")(x).view(2, 256)
    scale = x.view(2, 256).abs().mean(1, keepdim=True)
    assert torch.equal(s.sign(), x.view(2, 256).sign())
    assert torch.allclose(s.abs(), scale.expand(2, 256))
    t = phi_rate.plain("ternary")(x).view(2, 256)
    for row in t:  # -c, 0 or +c per block, zeros where |x| is small
        assert len(set(row.abs().unique().tolist()) - {0.0}) == 1
    assert bool((t == 0).any()) and bool((t != 0).any())
    pm = torch.tensor([0.5, -0.5] * 128)  # one magnitude: both codes are exact
    assert torch.equal(phi_rate.plain("sign")(pm), pm)
    assert torch.equal(phi_rate.plain("ternary")(pm), pm)


def test_oracle_window_never_fails_and_errs_at_most_half_a_step():
    g = torch.Generator().manual_seed(2)
    ref = 10 * torch.randn(1024, generator=g)
    phi = ref + 0.05 * torch.randn(1024, generator=g)
    # an even count of residues covers one step less on the negative side: margin 1.2 at 8
    for residues, margin in ((3, 1.0), (5, 1.0), (8, 1.2)):
        got, ok = phi_rate.oracle_lattice(residues, margin)(phi, ref, None, 0)
        assert ok.all(), residues
        big = (phi - ref).abs().view(-1, 256).amax(1)
        step = (margin * big / ((residues - 1) / 2)).repeat_interleave(256)
        assert bool(((got - phi).abs() <= step / 2 + 1e-5).all()), residues


def test_sketch_window_decodes_and_a_new_partner_surprises_a_remembered_window():
    ref, _ = phi_rate.run(phi_rate.exact, **SMALL)
    d, failed = phi_rate.run_sequential(phi_rate.sketch_lattice(5, 1.5), phi_rate.plain("sign"),
                                        feedback=True, **SMALL)  # fmt: skip
    assert failed < 0.05 and d < 1.3 * ref, (d, failed, ref)
    surprise = phi_rate.window_surprise(**SMALL)
    assert surprise["new"][1] > 3 * surprise["again"][1], surprise


def test_the_part_of_the_miss_each_member_knows_is_a_weaker_feedback_than_the_whole():
    """docs/quality.md, "Stale windows and the cap": with a mod-5 frame and one-bit offsets the
    whole miss fed back by both members keeps the sites closest; each member's own part (what
    ``loco.outer.landing`` can know) less so; the parts times n (so they add up to the pair's
    whole excess) are worse still, and nothing fed back is worse than the whole."""
    dist = {}
    for fb in (True, "partial", "partial-sum", False):
        code = (phi_rate.sketch_lattice(5, 1.5), phi_rate.plain("sign"))
        dist[fb], _ = phi_rate.run_sequential(*code, feedback=fb, **SMALL)
    assert dist[True] < dist["partial"] < dist["partial-sum"], dist
    assert dist[True] < dist[False], dist
