"""The lattice's spread estimate (``loco.outer.spread.Spread``) through a pair of
``RangePayloads``: a frame with every block failed restarts the estimate; a partner with one's
own phi leaves it as it was."""

from __future__ import annotations

import pytest
import torch

from loco.outer import lattice
from loco.outer.exchange import RangePayloads
from loco.outer.spread import Spread


def setup(seed, members=2, **options):
    """A generator, a phi and an outer momentum of 4096 values, and ``members`` ranks' payloads
    with the 4-bit lattice (``options``: more ``RangePayloads`` arguments)."""
    n = 4096
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g) * 0.05
    mom = torch.randn(n, generator=g) * 1e-3
    pays = [RangePayloads(shard=(0, n), owned=(0, n), phi_lattice=True, phi_lattice_bits=4,
                          **options) for _ in range(members)]  # fmt: skip
    return g, phi, mom, pays


def exchange(a, b, rounds, phis, mom, groups=(None, None)):
    """``a`` and ``b`` swap lattice frames for ``rounds`` (``phis(t)``: their phis; ``groups``:
    the partners each names at encode); the size of ``a``'s frame and ``b``'s failed-block count
    after each round."""
    n = mom.numel()
    zero = torch.zeros(n)
    sizes, failed = [], []
    for t in rounds:
        pa, pb = phis(t)
        _, bufs_a = a.encode(t, zero, pa, mom, group=groups[0])
        _, bufs_b = b.encode(t, zero, pb, mom, group=groups[1])
        b.validator([], False, b._ref)(bufs_a["phi"][0], n, 0)
        a.validator([], False, a._ref)(bufs_b["phi"][0], n, 0)
        sizes.append(len(bufs_a["phi"][0]))
        failed.append(b.lattice_failed)
    return sizes, failed


@pytest.mark.parametrize("fallback", [8, 6])
def test_round_one_shows_only_coding_error_and_leaves_the_estimate_unset(fallback):
    """Sites start from one phi, so round 1's decoded spread is within a grid step: the 8-bit
    code's rounding, not the partners' distance. It leaves the estimate unset, so round 2 is
    again by the momentum rule and decodes against phis that parted; round 3 is sized from
    round 2's real spread. (Before, round 1's rounding sized round 2's 4-bit frame, which
    failed every block: that pair did not land.) With ``phi_fallback_bits=6`` the momentum
    rule's frames are 6-bit under the 8-bit rule's window, and still decode every block."""
    g, phi, mom, (a, b) = setup(3, phi_fallback_bits=fallback)
    n = phi.numel()

    def phis(t):
        if t == 1:
            return phi, phi
        return (phi + torch.randn(n, generator=g) * 1e-3, phi + torch.randn(n, generator=g) * 1e-3)

    sizes, failed = exchange(a, b, (1, 2, 3, 4), phis, mom)
    fb, f4 = lattice.frame_bytes(n, 256, fallback), lattice.frame_bytes(n, 256, 4)
    assert sizes == [fb, fb, f4, f4]
    assert failed == [0, 0, 0, 0]


def test_a_pair_that_met_again_keeps_the_window_its_last_real_partner_set():
    """A pair that landed together has one phi; meeting again, each decodes the other within a
    grid step. That leaves the estimate as it was, so the next partner, whose phi is as far as
    the one before, still decodes every block. (A decay toward the rounding would have sized
    the window to the code's own error.)"""
    g, phi, mom, (a, b) = setup(5)
    n = phi.numel()
    far = {t: torch.randn(n, generator=g) * 1e-3 for t in range(8)}

    def phis(t):
        if t in (4, 5, 6):  # met again: one phi
            return phi, phi
        return phi + far[t], phi - far[t]

    exchange(a, b, (1, 2, 3), phis, mom)
    spread = a.spread.value.clone()
    _, failed = exchange(a, b, (4, 5, 6), phis, mom)
    assert torch.equal(a.spread.value, spread)  # three rounds at one phi changed nothing
    _, after = exchange(a, b, (7,), phis, mom)
    assert after[0] - failed[-1] <= 1, (failed, after)  # at most one block of 16 failed


def test_a_frame_with_every_block_failed_restarts_from_the_momentum_rule():
    sp = Spread(decay=0.5, grow=4.0)
    sp.observe(lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([1.0, 2.0])))
    assert sp.value is not None
    sp.observe(lattice.Decoded(torch.zeros(2), 2, 2, torch.tensor([float("nan")] * 2)))
    assert sp.value is None


def test_rounding_sizes_frames_only_while_the_group_stays_the_same():
    """A pair that keeps meeting (two sites) has one phi: its frames show only rounding. That
    leaves ``value`` unset, but sizes the next frame while the group is the same; another group
    (or none known) gets the momentum rule (no estimate)."""
    steps = torch.tensor([1.0, 1.0])
    rounding = lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([0.5, 0.25]), 1, steps)
    sp = Spread()
    sp.regroup(("us",))
    sp.observe(rounding)
    assert sp.value is None and sp.estimate().tolist() == [0.5, 0.5]
    sp.regroup(("us",))  # the same partner next round
    assert sp.estimate().tolist() == [0.5, 0.5]
    sp.regroup(("asia",))  # another: its phi is not ours
    assert sp.estimate() is None
    sp.regroup(("us",))  # back: a group in between, so the rounding is gone
    assert sp.estimate() is None
    sp.observe(rounding)
    sp.regroup(None)  # group not known
    assert sp.estimate() is None


def test_a_real_distance_sets_the_estimate_whatever_the_group():
    steps = torch.tensor([1.0])
    sp = Spread()
    sp.regroup(("us",))
    sp.observe(lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([0.5]), 1, steps))
    sp.observe(lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([2.0]), 1, steps))
    assert sp.value.tolist() == [2.0] and sp.rounding is None
    sp.regroup(("asia",))
    assert sp.estimate().tolist() == [2.0]
    sp.observe(lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([0.25]), 1, steps))
    assert sp.estimate().tolist() == [2.0]  # set: rounding changes nothing
    sp.observe(lattice.Decoded(torch.zeros(1), 1, 1, torch.tensor([float("nan")]), 1, steps))
    assert sp.estimate() is None  # every block failed: start over


def test_a_pair_that_kept_meeting_then_parts_decodes_its_next_partner():
    """Four rounds of one pair with one phi (the frames narrow to 4 bits on the rounding), then
    a new partner whose phi is really apart: the first frame to it is 8-bit by the momentum
    rule and decodes in every block. (Taking the rounding as the estimate whatever the group
    failed that frame whole: rounds 7-8 of two seeds at 80 rounds.)"""
    g, phi, mom, (a, b, c) = setup(11, members=3)
    n = phi.numel()
    sizes, failed = exchange(a, b, (1, 2, 3, 4), lambda t: (phi, phi), mom, (("b",), ("a",)))
    f8, f4 = lattice.frame_bytes(n, 256, 8), lattice.frame_bytes(n, 256, 4)
    assert sizes == [f8, f4, f4, f4] and failed == [0, 0, 0, 0]
    other = phi + torch.randn(n, generator=g) * 1e-3
    sizes, _ = exchange(a, c, (5,), lambda t: (phi, other), mom, (("c",), ("a",)))
    assert sizes == [f8] and c.lattice_failed == 0


def test_a_distance_older_than_two_rounds_sizes_no_frame_for_another_group():
    """A partner distance measures a partner about a round apart. Rounds without a new one (a
    pair that kept meeting, rounds as a leader, which decodes no phi) let the other pairs drift
    for as long: after ``stale`` (2) such rounds a frame for another group gets the momentum
    rule. For the group the distance came from, it still holds. (One pairing held for rounds
    2-7 of a 20-round run; round 8's frames, sized from round 2, failed in every block.)"""
    steps = torch.tensor([1.0])
    real = lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([2.0]), 1, steps)
    rounding = lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([0.25]), 1, steps)
    sp = Spread()
    sp.regroup(("us",))
    sp.observe(real)  # round 1: a real distance to us
    for _ in range(3):  # rounds 2-4: us again, one phi
        sp.regroup(("us",))
        assert sp.estimate().tolist() == [2.0]
        sp.observe(rounding)
    sp.regroup(("asia",))  # round 5: four rounds on
    assert sp.age == 4 and sp.estimate() is None
    sp.observe(real)  # asia's real distance: fresh again
    for group in (("sa",), ("us",)):  # two rounds led (no decode), then a third group
        sp.regroup(group)
        assert sp.estimate().tolist() == [2.0]
    sp.regroup(("eu",))
    assert sp.age == 3 and sp.estimate() is None


def test_a_partner_met_again_only_widens_the_estimate_and_does_not_renew_it():
    """A pair that keeps meeting converges: its distances shrink round by round (the first
    form of the rule followed them down, and round 8's new partner, six rounds apart, failed
    every block). They may widen the estimate, never narrow it, and they leave its age."""
    steps = torch.tensor([0.01, 0.01])

    def seen(a, b):
        return lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([a, b]), 1, steps)

    sp = Spread()
    sp.regroup(("us",))
    sp.observe(seen(2.0, 1.0))  # a new partner
    assert sp.age == 0 and sp.value.tolist() == [2.0, 1.0]
    sp.regroup(("us",))
    sp.observe(seen(0.5, 3.0))  # met again: 0.5 narrows nothing, 3.0 widens
    assert sp.value.tolist() == [2.0, 3.0] and sp.age == 1
    sp.regroup(("us",))
    sp.observe(seen(0.1, 0.1))
    assert sp.value.tolist() == [2.0, 3.0] and sp.age == 2
    sp.regroup(("us",))  # still the group it came from: it holds
    assert sp.estimate().tolist() == [2.0, 3.0]
    sp.regroup(("asia",))  # four rounds since a new partner
    assert sp.estimate() is None
    sp.observe(seen(0.5, 0.5))  # asia is new: the decay toward it, and recent again
    assert sp.value.tolist() == [1.0, 1.5] and sp.age == 0


def test_a_partner_that_shows_a_huge_distance_widens_the_next_window_only_to_the_cap():
    """A hostile partner's frame can decode far from our phi (its own steps are its choice),
    so the history rule would size our next frame from that distance, and our coding error
    with it. The window is capped at the 8-bit momentum rule's, ``CAP`` times the block's
    largest outer-momentum value: the step at most ``CAP * max|m| / 7`` at 4 bits."""
    _, phi, mom, (a, b) = setup(13)
    n = phi.numel()
    zero = torch.zeros(n)
    a.encode(1, zero, phi, mom, group=("b",))
    far, _ = lattice.encode(phi + 1e3, mom, bits=8, steps=torch.full((n // 256,), 64.0))
    a.validator([], False, a._ref)(far, n, 0)
    assert float(a.spread.value.min()) > 100.0  # it did see the distance
    _, bufs = a.encode(2, zero, phi, mom, group=("c",))
    frame = bufs["phi"][0]
    steps = torch.frombuffer(bytearray(frame[24 : 24 + 2 * (n // 256)]), dtype=torch.bfloat16)
    cap = lattice.CAP * mom.abs().view(-1, 256).amax(1) / 7
    assert bool((steps.float() <= cap * 1.01).all())  # bf16 rounds the step by < 1%
    _, own = lattice.encode(phi, mom, bits=4, steps=steps.float())
    assert float((own - phi).abs().max()) <= float(cap.max()) / 2 * 1.01


def test_a_huge_distance_on_a_block_that_never_moved_leaves_the_next_frame_finite():
    """A block with no outer momentum (never moved, padding) had no cap: a partner's frame
    decoded 6e37 away made the next window overflow to inf and the site's own encode raise.
    There the cap is the 8-bit window of the floor step, ``127 * max|phi| / 4096``."""
    _, phi, mom, (a, _) = setup(17)
    n = phi.numel()
    mom[:256] = 0.0
    zero = torch.zeros(n)
    a.encode(1, zero, phi, mom, group=("b",))
    far, _ = lattice.encode(phi + 6e37, mom, bits=8, steps=torch.full((n // 256,), 6e35))
    a.validator([], False, a._ref)(far, n, 0)
    _, bufs = a.encode(2, zero, phi, mom, group=("c",))
    frame = bufs["phi"][0]
    steps = torch.frombuffer(bytearray(frame[24 : 24 + 2 * (n // 256)]), dtype=torch.bfloat16)
    assert bool(torch.isfinite(steps.float()).all())
    floor = float(phi[:256].abs().max()) / 4096
    assert float(steps[0]) <= 127 * floor / 7 * 1.01


def test_the_shape_is_the_largest_squared_over_the_squared_norm_of_the_blocks_seen():
    """``Spread.shape`` (for the scaled windows): the sum over the blocks beyond rounding of the
    largest difference squared over the sum of their squared norms, half old and half new per
    frame; rounding-only and failed blocks do not count."""
    sp = Spread()
    steps = torch.full((4,), 1e-3)
    spread = torch.tensor([4e-3, 2e-3, 1e-4, float("nan")])  # the third is rounding
    sq = torch.tensor([2e-4, 1e-4, 5.0, float("nan")])
    sp.observe(lattice.Decoded(torch.zeros(4), 1, 4, spread, 1, steps, sq=sq))
    first = (16e-6 + 4e-6) / 3e-4
    assert abs(sp.shape - first) < 1e-6 * first  # fp32 inputs
    sp.observe(lattice.Decoded(torch.zeros(4), 0, 4, spread * 2, 1, steps, sq=sq))
    assert abs(sp.shape - (first + 4 * first) / 2) < 1e-6 * first
