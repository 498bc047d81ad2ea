"""phi modulo-quantized next to the receiver's own phi (``loco.outer.lattice``)."""

from __future__ import annotations

import pytest
import torch

from loco.compress import PayloadError
from loco.outer import lattice


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
        assert torch.equal(lattice.decode(buf, ref), own)


def test_a_larger_window_setting_gives_a_finer_grid_and_a_narrower_window():
    phi, m = _phi()
    buf8, own8 = lattice.encode(phi, m)
    buf32, own32 = lattice.encode(phi, m, window=32.0)
    s8, s32 = lattice.steps_for(phi, m), lattice.steps_for(phi, m, window=32.0)
    torch.testing.assert_close(s32 * 4, s8)  # here max|m| / window is above the floor
    assert (own32 - phi).abs().max() <= s32.max() / 2 + 1e-9
    assert len(buf32) == len(buf8)  # still one byte per value
    ref = phi + 60 * s32.min() * torch.ones_like(phi)
    assert torch.equal(lattice.decode(buf32, ref), own32)  # 60 steps away: inside
    with pytest.raises(PayloadError, match="outside the window"):
        lattice.decode(buf32, phi + 200 * s32.max())  # 200 of its steps away: outside
    assert torch.equal(lattice.decode(buf8, phi + 200 * s32.max()), own8)  # 50 of 8's: inside
    with pytest.raises(ValueError, match="window"):
        lattice.encode(phi, m, window=0.0)


def test_reference_outside_the_window_is_detected():
    phi, m = _phi()
    buf, _ = lattice.encode(phi, m)
    with pytest.raises(PayloadError, match="outside the window"):
        lattice.decode(buf, phi + 1.0)


def test_one_value_off_by_one_wrap_is_detected():
    phi, m = _phi()
    buf, _ = lattice.encode(phi, m)
    s = float(lattice.steps_for(phi, m)[0])
    ref = phi.clone()
    ref[3] += 200 * s  # this one value picks the neighbouring grid point of its residue
    with pytest.raises(PayloadError):
        lattice.decode(buf, ref)


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
