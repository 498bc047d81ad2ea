"""The coded-phi toy (scripts/experiments/phi_rate.py) behind docs/outer.md's rate table: exact
codes reproduce exact phi's distance, an ideal code at 3 bits stays within a few percent of it,
and pulling half of the blocks per round leaves the sites much farther apart."""

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
