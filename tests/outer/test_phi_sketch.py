"""The landing's phi sketch (loco/outer/phi_sketch.py): the frame is checked before use, the
signs do not depend on how the flat vector is split, and the windows follow the difference."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from loco.compress import PayloadError
from loco.outer import phi_sketch
from loco.outer.exchange import RangePayloads

BLOCK = 256


def test_signs_are_the_same_however_the_vector_is_split():
    whole = phi_sketch.signs(0, 10_000)
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(whole.mean())) < 0.05  # about half each
    for lo, n in ((0, 3000), (3000, 4096), (7096, 2904)):
        assert torch.equal(phi_sketch.signs(lo, n), whole[lo : lo + n])


def test_a_sketch_sees_a_difference_even_over_each_block():
    """Two vectors apart by ``c`` on every value (a shifted row, a bias): the squared sketch
    difference per block has mean ``256 c^2`` (the signs sum like coin flips: over 4096 blocks
    the mean of a chi-square of one degree is within 10% of 1, at 4.5 sds), and no block's
    signs are balanced by construction (about 5% of fair coin sums of 256 are exactly 0)."""
    n, c = 4096 * BLOCK, 0.5
    sgn = phi_sketch.signs(0, n)
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    d2 = (phi_sketch.sketch(x + c, sgn, BLOCK) - phi_sketch.sketch(x, sgn, BLOCK)).pow(2)
    assert abs(float(d2.mean()) / (BLOCK * c * c) - 1.0) < 0.1
    zero = float((sgn.reshape(-1, BLOCK).sum(1) == 0).float().mean())
    assert 0.03 < zero < 0.075, zero


def test_a_frame_decodes_to_each_blocks_projection_per_value():
    phi = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    sgn = phi_sketch.signs(0, 1000)
    buf = phi_sketch.encode(phi, sgn, BLOCK)
    assert len(buf) == phi_sketch.frame_bytes(1000, BLOCK) == 28 + 2 * 4 + 4
    got = phi_sketch.decode(buf, 1000)
    want = [float((phi[b : b + BLOCK] * sgn[b : b + BLOCK]).sum()) for b in range(0, 1000, BLOCK)]
    assert got.numel() == 1000
    top = max(abs(w) for w in want)  # fp16 under a scale that puts it at 2**15: 11 bits of it
    for i, w in enumerate(want):
        part = got[i * BLOCK : (i + 1) * BLOCK]
        assert bool((part == part[0]).all()) and abs(float(part[0]) - w) <= top * 2.0**-11, i


def test_a_frame_keeps_each_projection_to_fp16_precision_whatever_its_range():
    """Projections from 1e-30 to 1e30 times a unit: each within 2**-11 of itself (or of the
    largest over 2**26, fp16's subnormal floor under the frame's scale), never inf."""
    for unit in (1e-30, 1e-3, 1.0, 1e5, 1e30):
        s = torch.tensor([0.0, 1.0, -3.5, 1000.0, -1e-6], dtype=torch.float64) * unit
        got = phi_sketch.decode(phi_sketch.frame(s.float(), 5, 1), 5).double()
        err = (got - s.float().double()).abs()
        assert bool((err <= s.abs() * 2.0**-11 + 1000 * unit * 2.0**-26).all()), (unit, got)


def _reframe(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b[:10], "too short"),
        (lambda b: b"XXXX" + b[4:], "not a phi sketch"),
        (lambda b: _reframe(b[:4] + bytes([phi_sketch.VERSION + 1]) + b[5:-4]), "not a phi sketch"),
        (lambda b: _reframe(b[:8] + struct.pack("<Q", 999) + b[16:-4]), "bad sketch header"),
        (lambda b: _reframe(b[:16] + struct.pack("<I", 0) + b[20:-4]), "bad sketch header"),
        (lambda b: _reframe(b[:20] + struct.pack("<I", 5) + b[24:-4]), "bad sketch header"),
        (lambda b: _reframe(b[:-8]), "header implies"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: _reframe(b[:24] + struct.pack("<f", float("nan")) + b[28:-4]), "not finite"),
        (lambda b: _reframe(b[:24] + struct.pack("<f", 0.0) + b[28:-4]), "positive"),
        (lambda b: _reframe(b[:24] + struct.pack("<f", -1.0) + b[28:-4]), "positive"),
        (lambda b: _reframe(b[:28] + bytes([0x00, 0x7C]) + b[30:-4]), "not finite"),  # fp16 inf
        (lambda b: _reframe(b[:24] + struct.pack("<f", 3e38) + b[28:-4]), "not finite"),
    ],
)
def test_bad_frames_are_refused(mutate, match):
    buf = phi_sketch.encode(torch.ones(1000), phi_sketch.signs(0, 1000), BLOCK)
    with pytest.raises(PayloadError, match=match):
        phi_sketch.decode(mutate(buf), 1000)


def test_the_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ValueError, match="NaN"):
        phi_sketch.encode(torch.tensor([float("inf")]), phi_sketch.signs(0, 1), BLOCK)
    with pytest.raises(ValueError, match="block"):
        phi_sketch.encode(torch.zeros(4), phi_sketch.signs(0, 4), 0)


def test_windows_follow_the_rms_difference_of_each_group_of_blocks():
    """Two phis that differ by Gaussian noise of sd 1e-2 on the first half and 1e-1 on the
    second: the step per block is margin x the rms / (2**(bits-1) - 1), the rms estimated from
    16 one-sample blocks: sqrt(chi2_16 / 16) lies in [0.4, 1.7] with probability 0.9998."""
    gen = torch.Generator().manual_seed(3)
    n = 64 * BLOCK
    phi = torch.randn(n, generator=gen)
    sd = torch.cat([torch.full((n // 2,), 1e-2), torch.full((n // 2,), 1e-1)])
    other = phi + sd * torch.randn(n, generator=gen)
    sgn = phi_sketch.signs(0, n)
    own, far = phi_sketch.sketch(phi, sgn, BLOCK), phi_sketch.sketch(other, sgn, BLOCK)
    mom = torch.ones(n)  # a cap far above these differences
    steps = phi_sketch.steps_from_sketches(phi, own, [far], bits=4, block=BLOCK, margin=4.0,
                                           momentum=mom)  # fmt: skip
    want = 4.0 * sd[::BLOCK] / 7
    ratio = steps / want
    assert float(ratio.min()) > 0.4 and float(ratio.max()) < 1.7, ratio
    # a follower equal to the leader: no difference, the floor max|phi| / 4096
    flat = phi_sketch.steps_from_sketches(phi, own, [own], bits=4, block=BLOCK, margin=4.0,
                                          momentum=mom)  # fmt: skip
    floor = phi.view(-1, BLOCK).abs().amax(1) / 4096
    assert torch.allclose(flat, floor, rtol=1e-2)
    # two followers: the farther one sizes the window
    both = phi_sketch.steps_from_sketches(phi, own, [own, far], bits=4, block=BLOCK,
                                          margin=4.0, momentum=mom)  # fmt: skip
    assert torch.equal(both, steps)


def test_a_partners_sketch_lines_up_with_the_own_blocks():
    """The pulled sketch (per value on the owned range) gives each own block its projection;
    blocks past the owned range keep the own projection (no difference there)."""
    p = RangePayloads(shard=(0, 4 * BLOCK), owned=(0, 3 * BLOCK + 10), codec="int8",
                      phi_lattice=True)  # fmt: skip
    phi = torch.randn(3 * BLOCK + 10, generator=torch.Generator().manual_seed(1))
    p._ref = p._padded(phi)
    p._own_sketch = phi_sketch.sketch(p._ref, p._signs(), BLOCK)  # what encode() keeps
    other = phi + 0.5
    buf = phi_sketch.encode(p._padded(other), p._signs(), BLOCK)
    expanded = phi_sketch.decode(buf, 4 * BLOCK)[: p.numel]
    blocks = p.own_blocks(expanded)
    want = phi_sketch.sketch(p._padded(other), p._signs(), BLOCK)
    sent = phi_sketch.decode(phi_sketch.frame(want, 4 * BLOCK, BLOCK), 4 * BLOCK)[::BLOCK]
    assert torch.equal(blocks, sent)  # every block starts inside the owned range


def test_a_hostile_sketch_widens_the_window_no_further_than_the_momentum_rule():
    """A follower's sketch of huge values (or one that makes the difference overflow) cannot
    make the leader's grid coarser than the 8-bit momentum rule's window, 127/8 times the
    block's largest outer-momentum value, over the frame's half-range: the leader's own coding
    error stays bounded by its own outer step."""
    n = 8 * BLOCK
    phi = torch.randn(n, generator=torch.Generator().manual_seed(4))
    mom = torch.full((n,), 1e-3)
    own = phi_sketch.sketch(phi, phi_sketch.signs(0, n), BLOCK)
    for bad in (torch.full_like(own, 1e30), torch.full_like(own, 3e38), -own * 1e38):
        steps = phi_sketch.steps_from_sketches(phi, own, [bad], bits=4, block=BLOCK,
                                               margin=5.0, momentum=mom)  # fmt: skip
        assert bool(torch.isfinite(steps).all())
        cap = 127 / 8 * 1e-3 / 7
        assert float(steps.max()) <= cap * 1.01, (float(steps.max()), cap)


def _profiled(blocks=2000, seed=0):
    """phi, a partner's phi and the blocks' largest differences: Gaussian differences whose rms
    varies 30x over the blocks."""
    g = torch.Generator().manual_seed(seed)
    rms = torch.exp(torch.randn(blocks, generator=g))  # a lognormal profile
    diff = torch.randn(blocks, BLOCK, generator=g) * rms[:, None] * 1e-3
    phi = torch.randn(blocks * BLOCK, generator=g) * 0.05
    return phi, phi + diff.reshape(-1), diff.abs().amax(1), diff.pow(2).sum(1)


def test_scaled_spread_takes_the_profile_from_memory_and_the_scale_from_the_sketches():
    """A remembered spread with the right profile but 5x too wide (an earlier partner was
    farther): rescaled by the sketches of this partner it is the blocks' largest differences
    to within the estimate's upward margin (3 sds of the median of 2000 chi-squares: ~16% on
    the squared scale, ~8% on the scale; the estimate's own error about half that), and a
    4-bit frame under 1.5x of it decodes."""
    from loco.outer import lattice

    phi, partner, largest, sq = _profiled()
    sgn = phi_sketch.signs(0, phi.numel())
    own, other = phi_sketch.sketch(phi, sgn, BLOCK), phi_sketch.sketch(partner, sgn, BLOCK)
    shape = float(largest.pow(2).sum() / sq.sum())
    scaled = phi_sketch.scaled_spread(5 * largest, shape, own, [other])
    ratio = scaled / largest  # one factor for every block
    assert float(ratio.max() - ratio.min()) < 1e-5
    assert 1.0 < float(ratio[0]) < 1.2, float(ratio[0])
    steps = lattice.steps_for_spread(phi, scaled, 4, BLOCK, 1.5)
    buf, own_phi = lattice.encode(phi, torch.zeros_like(phi), BLOCK, bits=4, steps=steps)
    got = lattice.decode(buf, partner)
    assert got.failed + got.repaired <= 0.01 * got.blocks, (got.failed, got.repaired)


def test_scaled_spread_keeps_the_memory_where_the_sketches_say_too_little():
    """Too few blocks to estimate a scale (fewer than SCALE_MIN_BLOCKS), a follower equal to
    the leader, a zero spread: no scaled spread (the history rule sizes the frame). A hostile
    sketch rescales it by at most SCALE_RANGE."""
    phi, partner, largest, _ = _profiled(blocks=phi_sketch.SCALE_MIN_BLOCKS - 1)
    sgn = phi_sketch.signs(0, phi.numel())
    own, other = phi_sketch.sketch(phi, sgn, BLOCK), phi_sketch.sketch(partner, sgn, BLOCK)
    assert phi_sketch.scale_factor(largest, 0.04, own, other) == 0.0
    assert phi_sketch.scaled_spread(largest, 0.04, own, [other]) is None
    phi, partner, largest, _ = _profiled()
    sgn = phi_sketch.signs(0, phi.numel())
    own, other = phi_sketch.sketch(phi, sgn, BLOCK), phi_sketch.sketch(partner, sgn, BLOCK)
    assert phi_sketch.scaled_spread(largest, 0.04, own, [own]) is None
    assert phi_sketch.scaled_spread(0 * largest, 0.04, own, [other]) is None
    hostile = other + 1e30
    lo, hi = phi_sketch.SCALE_RANGE
    assert torch.equal(phi_sketch.scaled_spread(largest, 0.04, own, [hostile]), largest * hi)
    tiny = own + 1e-6
    assert torch.equal(phi_sketch.scaled_spread(largest, 0.04, own, [tiny]), largest * lo)


def test_the_scaled_leader_frame_takes_the_sketched_scale_where_the_history_is_stale():
    """Through ``RangePayloads``: a leader whose remembered spread came from a partner 4x
    farther than this round's (and is stale for this group: the history rule alone would send
    the momentum rule's 8-bit frame) encodes a 4-bit frame whose steps are the profile's at
    this round's scale, about 1/4 of the history rule's (x1.16, the estimate's 3-sd margin at
    400 blocks), and the follower decodes it."""
    from loco.outer import lattice
    from loco.outer.landing import Landing

    phi, partner, largest, _ = _profiled(blocks=400, seed=2)
    n = phi.numel()
    lead = RangePayloads(shard=(0, n), owned=(0, n), codec="int8", phi_lattice=True,
                         phi_lattice_bits=4, phi_lattice_margin=1.5)  # fmt: skip
    lead.landing = Landing(lead, codec="normal2", window="scaled")
    far = phi + 4 * (partner - phi)
    buf, _ = lattice.encode(far, torch.zeros(n), BLOCK, bits=8, steps=4 * largest / 100)
    lead.spread.regroup(("old",))
    lead.spread.observe(lattice.decode(buf, phi))  # a partner 4x farther, remembered
    remembered = lead.spread.value.clone()
    for group in (("a",), ("b",), ("c",)):  # three rounds with other groups: stale
        lead.spread.regroup(group)
    assert lead.spread.estimate() is None and lead.spread.shape is not None
    mom = torch.ones(n)  # a cap (127/8 of it) far above every window here
    lead.encode(5, torch.zeros(n), phi, mom, group=("c",))
    follower = phi_sketch.sketch(partner, phi_sketch.signs(0, n), BLOCK)
    frame, _ = lead.encode_leader(5, mom, [follower])
    got = lattice.decode(frame, partner)
    assert got.bits == 4 and got.failed == 0
    history = lattice.steps_for_spread(phi, remembered, 4, BLOCK, 1.5)
    ratio = got.steps / history
    assert 0.22 < float(ratio.median()) < 0.32, float(ratio.median())
