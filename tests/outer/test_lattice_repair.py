"""Repairing lattice blocks where a few values wrapped around the window
(``loco.outer.lattice_repair``): the repaired values are the sender's grid points bit for bit,
a block with more wrapped values than a repair moves stays failed and keeps the receiver's own
values, and a frame whose checks are not the sender's repairs nothing."""

from __future__ import annotations

import struct
import zlib

import torch

from loco.outer import lattice, lattice_repair


def _frame(bits: int, window_sd: float, n: int = 256 * 400, seed: int = 0):
    """A frame of phi at ``bits`` whose window is +-``window_sd`` sd of the partner's
    difference; returns (frame, sender's decoded values, the receiver's phi)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g)
    ref = phi + torch.randn(n, generator=g)  # the partner differs by N(0, 1)
    steps = torch.full((n // 256,), window_sd / 2 ** (bits - 1))
    buf, own = lattice.encode(phi, torch.zeros(n), bits=bits, steps=steps)
    return buf, own, ref


def test_gaussian_differences_past_the_edge_are_repaired_exactly():
    # window +-3.2 sd: P(|z| > 3.2) = 0.14%, about one value in 3 of the blocks wraps
    buf, own, ref = _frame(3, 3.2)
    got = lattice.decode(buf, ref)
    ok = ~torch.isnan(got.spread)
    assert got.repaired > 80  # without the repair these blocks fail
    assert got.failed < got.repaired / 5
    assert int(ok.sum()) == got.blocks - got.failed
    good = ok.repeat_interleave(256)
    assert torch.equal(got.values[good], own[good])  # every applied value is the sender's
    assert torch.equal(got.values[~good], ref[~good])


def test_two_wrapped_values_are_repaired_and_a_far_block_is_not():
    buf, own, ref = _frame(4, 4.0)
    ref = ref.clone()
    clean = lattice.decode(buf, ref)
    assert clean.failed == 0
    s = 4.0 / 8  # the grid step; 16 residues: the edge is 8 steps away
    ref[10] = own[10] + 9.3 * s  # just past the edge: decoded 6.7 steps the other side
    ref[20] = own[20] - 9.6 * s
    ref[512:768] += 40 * s  # block 2: every value wraps
    got = lattice.decode(buf, ref)
    assert got.failed == 1 and torch.equal(got.values[512:768], ref[512:768])
    assert torch.equal(got.values[:512], own[:512])


def test_a_frame_with_forged_checks_repairs_nothing():
    buf, _, ref = _frame(3, 2.7, n=256 * 200)
    mv = bytearray(buf)
    n_blocks = 200
    head = lattice._HEAD.size
    checks = head + 2 * n_blocks
    g = torch.Generator().manual_seed(5)
    forged = torch.randint(0, 2**32, (n_blocks,), generator=g, dtype=torch.int64)
    mv[checks : checks + 4 * n_blocks] = forged.numpy().astype("<u4").tobytes()
    struct.pack_into("<I", mv, len(mv) - 4, zlib.crc32(mv[:-4]))
    got = lattice.decode(bytes(mv), ref)
    assert got.repaired == 0 and got.failed == n_blocks  # no set matches a random check
    assert torch.equal(got.values, ref)


def test_the_check_constants_are_odd_and_not_arithmetic():
    mul = lattice_repair.multipliers(256)
    assert bool((mul % 2 == 1).all()) and int(mul.max()) < 2**32
    # with pos * K constants, mul[1] + mul[4] == mul[2] + mul[3]: two moves alias two others
    sums = {int(mul[a] + mul[b]) & 0xFFFFFFFF for a in range(64) for b in range(a + 1, 64)}
    assert len(sums) == 64 * 63 // 2
