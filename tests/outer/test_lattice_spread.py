"""The lattice's spread estimate (``loco.outer.lattice.Spread``) through a pair of
``RangePayloads``: a frame with every block failed restarts the estimate."""

from __future__ import annotations

import torch

from loco.outer import lattice
from loco.outer.exchange import RangePayloads


def test_a_frame_with_every_block_failed_restarts_from_the_momentum_rule():
    """Sites start from one phi, so round 1's observed spread is only 8-bit coding error, and
    round 2's frame, sized from it, fails every block. Widening by 4 per round took rounds 2-5
    of a 4-bit run to recover (no pull in any of them); now the round after such a frame is
    sent at 8 bits with the momentum rule, and the one after from the spread it saw."""
    n = 4096
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(n, generator=g) * 0.05
    mom = torch.randn(n, generator=g) * 1e-3
    zero = torch.zeros(n)
    a, b = (RangePayloads(shard=(0, n), owned=(0, n), phi_lattice=True, phi_lattice_bits=4)
            for _ in range(2))  # fmt: skip
    sizes, failed = [], []
    for t in (1, 2, 3, 4):
        pa = phi if t == 1 else phi + torch.randn(n, generator=g) * 1e-3
        pb = phi if t == 1 else phi + torch.randn(n, generator=g) * 1e-3
        _, bufs_a = a.encode(t, zero, pa, mom)
        _, bufs_b = b.encode(t, zero, pb, mom)
        b.validator([], False, b._ref)(bufs_a["phi"][0], n, 0)
        a.validator([], False, a._ref)(bufs_b["phi"][0], n, 0)
        sizes.append(len(bufs_a["phi"][0]))
        failed.append(b.lattice_failed)
    f8, f4 = lattice.frame_bytes(n, 256, 8), lattice.frame_bytes(n, 256, 4)
    assert sizes == [f8, f4, f8, f4]
    assert failed == [0, n // 256, n // 256, n // 256]  # only round 2 failed, every block
