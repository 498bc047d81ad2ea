"""The blocks' randomized Hadamard rotation, and lattice frames laid over it."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from loco.compress import PayloadError
from loco.outer import block_rotation, lattice


def test_rotation_keeps_norms_and_unrotate_inverts_it():
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(0))
    y = block_rotation.rotate(x, 7)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(block_rotation.unrotate(y, 7), x, atol=1e-5)
    assert not torch.allclose(y, x, atol=0.1)  # it does move the values


def test_only_the_first_rows_are_rotated():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    y = block_rotation.rotate(x, 2)
    assert torch.equal(y[2], x[2])
    assert not torch.equal(y[1], x[1])


def test_a_row_rotates_to_the_same_bits_whatever_the_other_rows():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 256, generator=g), torch.randn(9, 256, generator=g)
    b[4] = a[3]
    assert torch.equal(block_rotation.rotate(a, 5)[3], block_rotation.rotate(b, 9)[4])
    assert torch.equal(block_rotation.unrotate(a, 5)[3], block_rotation.unrotate(b, 9)[4])


def test_a_spike_is_spread_over_the_block():
    x = torch.zeros(1, 256)
    x[0, 17] = 16.0
    y = block_rotation.rotate(x, 1)
    # one value of 16 becomes 256 values of +-1 (16 / sqrt(256)); a constant block is not a
    # spike after the signs either: its largest rotated value is well below its norm
    assert torch.allclose(y.abs(), torch.ones(1, 256))
    c = block_rotation.rotate(torch.ones(1, 256), 1)
    assert float(c.abs().max()) < 0.5 * float(c.norm())


def _heavy_tailed(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phi and a partner's phi whose difference has 1% of its values 30x the rest."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g)
    d = torch.randn(n, generator=g) * 1e-3
    spikes = torch.rand(n, generator=g) < 0.01
    d[spikes] *= 30
    return phi, phi + d


def test_a_rotated_grid_decodes_a_heavy_tailed_difference_an_unrotated_one_cannot():
    n, block, bits = 256 * 64, 256, 4
    phi, other = _heavy_tailed(n, 3)
    rms = (other - phi).view(-1, block).pow(2).mean(1).sqrt()
    # a window of 4x each block's rms: a Gaussian's largest of 256 values is ~3 sd, the spikes
    # are ~30x the rest (several times the rms of a block holding two or three of them)
    steps = lattice.steps_for_spread(phi, 4 * rms, bits, block, 1.0)
    mom = torch.zeros(n)
    plain = lattice.decode(lattice.encode(phi, mom, bits=bits, steps=steps)[0], other)
    buf, own = lattice.encode(phi, mom, bits=bits, steps=steps, rotate=True)
    rot = lattice.decode(buf, other)
    assert plain.failed > plain.blocks // 2
    assert rot.failed <= 2
    ok = (~torch.isnan(rot.spread)).repeat_interleave(block)
    assert torch.equal(rot.values[ok], own[ok])  # the sender's own values, bit for bit
    # on the rotated grid each value is within half a step; rotated back, a block's l2 error is
    # at most sqrt(block) * s / 2
    err = (own - phi).view(-1, block).norm(dim=1)
    assert bool((err <= steps * block**0.5 / 2 * (1 + 1e-4)).all())
    assert float(rot.spread[~torch.isnan(rot.spread)].max()) < 4 * float(rms.max())


def test_a_partial_last_block_and_a_rank_edge_decode_rotated():
    n = 256 * 3 + 77
    phi, other = _heavy_tailed(n, 4)
    buf, own = lattice.encode(phi, torch.full((n,), 1e-2), bits=8, rotate=True)
    got = lattice.decode(buf, other)
    assert got.failed == 0 and torch.equal(got.values, own)
    ref = other.clone()
    ref[300:] = 0.0  # a receiver that holds only the first 300 values (a rank edge)
    edge = lattice.decode(buf, ref)
    assert torch.isnan(edge.spread[1:]).all() and not torch.isnan(edge.spread[0])
    assert torch.equal(edge.values[:256], own[:256]) and torch.equal(edge.values[256:], ref[256:])


def _reflag(frame: bytes, flags: int, block: int | None = None) -> bytes:
    b = bytearray(frame)
    b[6] = flags
    if block is not None:
        struct.pack_into("<I", b, 16, block)
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def test_unknown_flags_and_a_rotated_block_that_is_no_power_of_two_are_refused():
    phi = torch.randn(1000)
    buf, _ = lattice.encode(phi, torch.ones(1000), block=200, bits=8)
    with pytest.raises(PayloadError, match="flags"):
        lattice.decode(_reflag(buf, 0x2), phi)
    with pytest.raises(PayloadError, match="flags"):
        lattice.decode(_reflag(buf, lattice.ROTATED), phi)  # block 200
    with pytest.raises(ValueError, match="power of two"):
        lattice.encode(phi, torch.ones(1000), block=200, rotate=True)
