"""phi modulo-quantized next to the receiver's own phi (``loco.outer.lattice``)."""

from __future__ import annotations

import pytest
import torch

from loco.compress import PayloadError
from loco.outer import lattice
from loco.outer.spread import Spread


def _phi(n=3001, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.05, torch.randn(n, generator=g) * 1e-3


def test_roundtrip_next_to_a_close_reference_is_the_senders_own_value():
    phi, m = _phi()
    buf, own = lattice.encode(phi, m)
    assert len(buf) < 1.1 * phi.numel()
    s = lattice.steps_for(phi, m).max()
    assert (own - phi).abs().max() <= s / 2 + 1e-9
    for scale in (0.0, 1e-3, 5e-3):
        ref = phi + scale * torch.randn(phi.numel())
        got = lattice.decode(buf, ref)
        assert got.failed == 0 and torch.equal(got.values, own)


def test_a_momentum_rule_frame_at_fewer_bits_keeps_the_8_bit_window_with_coarser_steps():
    """``encode(bits=6)`` without steps cuts the 8-bit rule's window (+-127 steps) into +-31:
    the step is 127/31 of the 8-bit one (to bf16), a partner 100 8-bit steps away still
    decodes every block, and the frame is 3/4 of the 8-bit one's codes."""
    phi, m = _phi()
    buf8, _ = lattice.encode(phi, m)
    buf6, own6 = lattice.encode(phi, m, bits=6)
    s8, s6 = lattice.steps_for(phi, m), lattice.steps_for(phi, m, bits=6)
    torch.testing.assert_close(s6, s8 * 127 / 31, rtol=2**-7, atol=0)  # both rounded to bf16
    assert len(buf6) == lattice.frame_bytes(phi.numel(), 256, 6) < len(buf8)
    assert (own6 - phi).abs().max() <= s6.max() / 2 + 1e-9
    near = phi + 100 * s8.min()  # 100 of the 8-bit steps: inside +-127 of them
    got = lattice.decode(buf6, near)
    assert got.failed == 0 and torch.equal(got.values, own6)
    far = phi + 140 * s8.max()  # outside the 8-bit window, so outside the 6-bit one too
    assert lattice.decode(buf6, far).failed == lattice.decode(buf6, far).blocks


def test_window_slack_is_the_bits_a_window_sized_to_each_blocks_distance_saves():
    """phi on the grid (steps 1/16, 4 bits: half-window 8 steps = 0.5) and a reference whose
    largest distance is 0.25 in every block: one bit of slack per block; a half-window of 16
    steps (5 bits): two. Next to itself a frame shows only rounding: nothing counted."""
    n, block = 1024, 256
    g = torch.Generator().manual_seed(1)
    phi = torch.randint(-200, 200, (n,), generator=g).float() / 16
    delta = (torch.rand(n, generator=g) - 0.5) * 0.4
    delta[::block] = 0.25  # each block's largest distance
    steps = torch.full((n // block,), 1 / 16)
    for bits, want in ((4, 1.0), (5, 2.0)):
        buf, own = lattice.encode(phi, torch.zeros(n), block, bits=bits, steps=steps)
        got = lattice.decode(buf, phi - delta)
        assert got.failed == 0 and torch.equal(got.values, own)
        total, sq, count = lattice.window_slack(got)
        assert count == n // block and abs(total / count - want) < 1e-6
        assert abs(sq / count - want**2) < 1e-6  # one slack on every block: no spread
    assert lattice.window_slack(lattice.decode(buf, phi)) == (0.0, 0.0, 0)


def test_a_larger_window_setting_gives_a_finer_grid_and_a_narrower_window():
    phi, m = _phi()
    buf8, own8 = lattice.encode(phi, m)
    buf32, own32 = lattice.encode(phi, m, window=32.0)
    s8, s32 = lattice.steps_for(phi, m), lattice.steps_for(phi, m, window=32.0)
    torch.testing.assert_close(s32 * 4, s8)  # here max|m| / window is above the floor
    assert (own32 - phi).abs().max() <= s32.max() / 2 + 1e-9
    assert len(buf32) == len(buf8)  # still one byte per value
    ref = phi + 60 * s32.min() * torch.ones_like(phi)
    assert torch.equal(lattice.decode(buf32, ref).values, own32)  # 60 steps away: inside
    far = phi + 200 * s32.max()  # 200 of its steps away: outside, every block
    got = lattice.decode(buf32, far)
    assert got.failed == got.blocks and torch.equal(got.values, far)
    assert torch.equal(lattice.decode(buf8, far).values, own8)  # 50 of 8's: inside
    with pytest.raises(ValueError, match="window"):
        lattice.encode(phi, m, window=0.0)


def test_reference_outside_the_window_is_detected_and_our_own_phi_kept():
    phi, m = _phi()
    buf, _ = lattice.encode(phi, m)
    ref = phi + 1.0
    got = lattice.decode(buf, ref)
    assert got.failed == got.blocks == 12 and torch.equal(got.values, ref)
    assert bool(torch.isnan(got.spread).all())


def test_one_value_off_by_one_wrap_is_repaired_and_three_are_detected():
    phi, m = _phi()
    buf, own = lattice.encode(phi, m)
    s = float(lattice.steps_for(phi, m)[0])
    ref = phi.clone()
    ref[3] += 200 * s  # this one value picks the neighbouring grid point of its residue
    got = lattice.decode(buf, ref)
    assert got.failed == 0 and got.repaired == 1  # the one wrapped value is moved back
    assert torch.equal(got.values, own)
    ref[[5, 7, 9]] += 200 * s  # four wrapped values in block 0: more than a repair moves
    got = lattice.decode(buf, ref)
    assert got.failed == 1 and got.repaired == 0  # block 0 keeps our own values
    assert torch.equal(got.values[:256], ref[:256])
    assert torch.equal(got.values[256:], own[256:])


@pytest.mark.parametrize("cut", [0, 10, -1])
def test_malformed_frames_raise_payload_error(cut):
    phi, m = _phi(n=300)
    buf = bytearray(lattice.encode(phi, m)[0])
    if cut == 0:
        buf[0] ^= 1
    elif cut == 10:
        buf = buf[:10]
    else:
        buf[-5] ^= 0xFF
    with pytest.raises(PayloadError):
        lattice.decode(bytes(buf), phi)


def test_nonfinite_phi_is_refused():
    phi, m = _phi(n=10)
    phi[2] = float("nan")
    with pytest.raises(ValueError):
        lattice.encode(phi, m)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_low_bit_frames_decode_inside_the_window_and_fail_per_block_outside(bits):
    n, block = 4099, 256
    g = torch.Generator().manual_seed(bits)
    phi = torch.randn(n, generator=g) * 0.05
    diff = torch.randn(n, generator=g) * 1e-3
    nb = -(-n // block)
    spread = torch.full((nb,), float(diff.abs().max()))
    steps = lattice.steps_for_spread(phi, spread, bits, block, margin=1.0)
    buf, own = lattice.encode(phi, torch.zeros(n), block=block, bits=bits, steps=steps)
    assert len(buf) == lattice.frame_bytes(n, block, bits)
    assert len(buf) <= n * bits / 8 + nb * 6 + 40
    assert float((own - phi).abs().max()) <= float(steps.max()) / 2 * (1 + 1e-6)
    # the receiver is within the window (margin 1 covers the largest difference)
    got = lattice.decode(buf, phi + diff)
    assert got.failed == 0 and torch.equal(got.values, own)
    # one block far outside: only that block falls back to our own phi
    ref = phi + diff
    ref[block : 2 * block] += 10 * float(steps[1]) * 2**bits
    got = lattice.decode(buf, ref)
    assert got.failed == 1 and torch.equal(got.values[block : 2 * block], ref[block : 2 * block])
    assert torch.equal(got.values[:block], own[:block])


def test_skip_frame_keeps_our_own_phi():
    ref = torch.randn(1000)
    buf = lattice.skip_frame(1000)
    assert len(buf) == lattice.frame_bytes(1000, 256, 0) == 28
    got = lattice.decode(buf, ref)
    assert got.blocks == 0 and torch.equal(got.values, ref)
    with pytest.raises(PayloadError, match="reference"):
        lattice.decode(buf, torch.zeros(999))


def test_spread_follows_observations_and_widens_failed_blocks():
    sp = Spread(decay=0.5, grow=4.0)
    d = lattice.Decoded(torch.zeros(3), 1, 3, torch.tensor([1.0, float("nan"), 0.5]))
    sp.observe(d)
    assert sp.value.tolist() == [1.0, 4.0, 0.5]  # never seen: 4 x the largest seen
    sp.observe(lattice.Decoded(torch.zeros(3), 1, 3, torch.tensor([0.1, 0.2, float("nan")])))
    assert sp.value.tolist() == [0.5, 2.0, 2.0]  # decay to half; failed: x4
    sp.observe(lattice.Decoded(torch.zeros(0), 0, 0, torch.zeros(0)))  # a skip frame: ignored
    assert sp.value.tolist() == [0.5, 2.0, 2.0]


def test_range_payloads_send_8_bits_first_then_fewer_and_skip_between():
    from loco.outer.exchange import RangePayloads

    n = 4096
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(n, generator=g) * 0.05
    a, b = (RangePayloads(shard=(0, n), owned=(0, n), codec="int8", phi_lattice=True,
                          phi_lattice_bits=3, phi_every=2) for _ in range(2))  # fmt: skip
    zero = torch.zeros(n)
    sizes = []
    for t in (1, 2, 3):
        _, bufs_a = a.encode(t, zero, phi, torch.randn(n, generator=g) * 1e-3)
        other = phi + torch.randn(n, generator=g) * 1e-3
        b.encode(t, zero, other, zero)  # b's own phi of the round: the decoding reference
        sink: list[torch.Tensor] = []
        b.validator(sink, False, b._ref)(bufs_a["phi"][0], n, 0)
        a.validator([], False, a._ref)(b.encode(t, zero, other, zero)[1]["phi"][0], n, 0)
        sizes.append(len(bufs_a["phi"][0]))
    assert sizes[0] == lattice.frame_bytes(n, 256, 8)  # nothing observed yet: 8 bits
    assert sizes[1] == lattice.frame_bytes(n, 256, 0) == 28  # round 2: no phi
    assert sizes[2] == lattice.frame_bytes(n, 256, 3)  # round 3: 3 bits, from the spread seen
    assert a.lattice_failed == 0 and b.lattice_failed == 0


def test_a_partner_with_another_rank_count_decodes_on_our_blocks():
    """A one-rank sender's frame covers [0, 1040); our rank owns [520, 1000) of a two-rank
    site. The frame's blocks inside our range decode to the sender's grid values; the block
    across our edge (512-768) fails (our own phi kept there) and is the only failure counted."""
    from loco.outer.exchange import LatticeTally, RangePayloads

    g = torch.Generator().manual_seed(3)
    phi = torch.randn(1000, generator=g)
    near = phi + 1e-4 * torch.randn(1000, generator=g)
    sender = RangePayloads(shard=(0, 1040), owned=(0, 1000), phi_lattice=True)
    mine = RangePayloads(shard=(520, 1040), owned=(520, 1000), phi_lattice=True)
    out, bufs = sender.encode(1, torch.zeros(1000), phi)
    mine.encode(1, torch.zeros(480), near[520:])
    values, tally = [], LatticeTally(masks=[])
    check = mine.validator(values, False, mine._ref, tally)
    check(memoryview(bufs["phi"][0]), 1040, 0)
    got, bad = values[0], tally.masks[0]
    assert torch.equal(got[768:1000], out.phi[768:1000])  # the sender's own decoded values
    assert torch.equal(got[520:768], near[520:768])  # the edge block failed: ours kept
    assert bad[520:768].all() and not bad[768:1000].any()
    assert tally.failed == [1] and (mine.lattice_blocks, mine.lattice_failed) == (2, 1)
    with pytest.raises(PayloadError):  # a frame that does not match its segment
        check(memoryview(bufs["phi"][0]), 1000, 0)
    mine.max_numel = 1000  # a segment past what a partner may make us allocate
    with pytest.raises(PayloadError, match="more than 1000"):
        check(memoryview(bufs["phi"][0]), 1040, 0)
    for cut in (0, 10, 100, len(bufs["phi"][0]) - 1):  # cut frames: a clean refusal
        with pytest.raises(PayloadError):
            check(memoryview(bytes(bufs["phi"][0])[:cut]), 1040, 0)
