"""The lattice's spread estimate (``loco.outer.lattice.Spread``) through a pair of
``RangePayloads``: a frame with every block failed restarts the estimate; a partner with one's
own phi leaves it as it was."""

from __future__ import annotations

import torch

from loco.outer import lattice
from loco.outer.exchange import RangePayloads


def exchange(a, b, rounds, phis, mom):
    """``a`` and ``b`` swap lattice frames for ``rounds`` (``phis(t)``: their phis); the size
    of ``a``'s frame and ``b``'s failed-block count after each round."""
    n = mom.numel()
    zero = torch.zeros(n)
    sizes, failed = [], []
    for t in rounds:
        pa, pb = phis(t)
        _, bufs_a = a.encode(t, zero, pa, mom)
        _, bufs_b = b.encode(t, zero, pb, mom)
        b.validator([], False, b._ref)(bufs_a["phi"][0], n, 0)
        a.validator([], False, a._ref)(bufs_b["phi"][0], n, 0)
        sizes.append(len(bufs_a["phi"][0]))
        failed.append(b.lattice_failed)
    return sizes, failed


def test_round_one_shows_only_coding_error_and_leaves_the_estimate_unset():
    """Sites start from one phi, so round 1's decoded spread is within a grid step: the 8-bit
    code's rounding, not the partners' distance. It leaves the estimate unset, so round 2 is
    again 8 bits by the momentum rule and decodes against phis that parted; round 3 is sized
    from round 2's real spread. (Before, round 1's rounding sized round 2's 4-bit frame, which
    failed every block: that pair did not land.)"""
    n = 4096
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(n, generator=g) * 0.05
    mom = torch.randn(n, generator=g) * 1e-3
    a, b = (RangePayloads(shard=(0, n), owned=(0, n), phi_lattice=True, phi_lattice_bits=4)
            for _ in range(2))  # fmt: skip

    def phis(t):
        if t == 1:
            return phi, phi
        return (phi + torch.randn(n, generator=g) * 1e-3, phi + torch.randn(n, generator=g) * 1e-3)

    sizes, failed = exchange(a, b, (1, 2, 3, 4), phis, mom)
    f8, f4 = lattice.frame_bytes(n, 256, 8), lattice.frame_bytes(n, 256, 4)
    assert sizes == [f8, f8, f4, f4]
    assert failed == [0, 0, 0, 0]


def test_a_pair_that_met_again_keeps_the_window_its_last_real_partner_set():
    """A pair that landed together has one phi; meeting again, each decodes the other within a
    grid step. That leaves the estimate as it was, so the next partner, whose phi is as far as
    the one before, still decodes every block. (A decay toward the rounding would have sized
    the window to the code's own error.)"""
    n = 4096
    g = torch.Generator().manual_seed(5)
    phi = torch.randn(n, generator=g) * 0.05
    mom = torch.randn(n, generator=g) * 1e-3
    a, b = (RangePayloads(shard=(0, n), owned=(0, n), phi_lattice=True, phi_lattice_bits=4)
            for _ in range(2))  # fmt: skip
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
    sp = lattice.Spread(decay=0.5, grow=4.0)
    sp.observe(lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([1.0, 2.0])))
    assert sp.value is not None
    sp.observe(lattice.Decoded(torch.zeros(2), 2, 2, torch.tensor([float("nan")] * 2)))
    assert sp.value is None


def test_rounding_alone_becomes_the_estimate_after_a_few_frames_in_a_row():
    """A pair that always meets (two sites) has one phi: every frame shows only rounding. The
    estimate stays unset (8-bit frames by the momentum rule) for TRUST_ROUNDING_AFTER - 1
    such frames, then takes the rounding, so such a pair gets to its few bits."""
    steps = torch.tensor([1.0, 1.0])
    rounding = lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([0.5, 0.25]), 1, steps)
    sp = lattice.Spread()
    for _ in range(lattice.TRUST_ROUNDING_AFTER - 1):
        sp.observe(rounding)
        assert sp.value is None
    sp.observe(rounding)
    assert sp.value.tolist() == [0.5, 0.5]  # the largest rounding seen, on every block
    sp.observe(lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([0.1, 0.1]), 1, steps))
    assert sp.value.tolist() == [0.5, 0.5]  # set: rounding changes nothing
    sp.observe(lattice.Decoded(torch.zeros(2), 0, 2, torch.tensor([3.0, 0.2]), 1, steps))
    assert sp.value.tolist() == [3.0, 0.5]  # a real distance on block 0 only


def test_a_real_distance_in_between_restarts_the_count():
    steps = torch.tensor([1.0])
    rounding = lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([0.5]), 1, steps)
    sp = lattice.Spread()
    for _ in range(lattice.TRUST_ROUNDING_AFTER - 1):
        sp.observe(rounding)
    sp.observe(lattice.Decoded(torch.zeros(1), 1, 1, torch.tensor([float("nan")]), 1, steps))
    assert sp.value is None and sp.rounding_only == lattice.TRUST_ROUNDING_AFTER - 1
    sp.observe(lattice.Decoded(torch.zeros(1), 0, 1, torch.tensor([2.0]), 1, steps))
    assert sp.value.tolist() == [2.0] and sp.rounding_only == 0
