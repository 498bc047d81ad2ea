"""How many bits per value a phi exchange needs: a toy model of coded phi, no training.

The toy of ``spread.py`` (N sites, white-noise deltas, random pairs, the real ``NoLoCo`` update in
the default form: weights, Nesterov, alpha 0.9, beta 0.7, gamma 1), with each site's phi reaching
its partner through a code. The pull uses the decoded values only (as ``loco.outer`` does), so a
code moves no pair's mean; a block that fails its check gets no pull on either side. Prints one
JSON line per code: the bits per value it sends (values plus a block's 6-byte step and check) and
the consensus distance (RMS distance of each site to its partner before the pull, mean over the
second half of the rounds) against exact phi's.

Codes:

- ``lattice``: the modulo lattice of ``loco/outer/lattice.py`` (``bits`` per value; a block's step
  from the largest partner difference the sender observed, times ``margin``).
- ``subsample``: exact values on a fraction of the blocks per round (a seed both ends share), no
  pull on the others: the limit of any design that sends a sparse part of phi each round.
- ``bound``: the Wyner-Ziv bound for a Gaussian difference with the partner's phi as side
  information: the decoded value is phi plus noise of variance ``var(diff) 2^(-2 rate)``. Not a
  code (the noise uses the difference, which the sender does not know): the best any code at
  that rate can do on this toy.

    python scripts/experiments/phi_rate.py          # ~3 min on one core
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loco.outer.methods import NoLoCo, OuterState  # noqa: E402

BLOCK = 256
BLOCK_BITS = 6 * 8  # a block's bf16 step and 32-bit check
# (sender's phi, receiver's phi, sender's observed spread per block, round) -> (decoded, ok per block)
Code = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def exact(phi: torch.Tensor, ref: torch.Tensor, spread: torch.Tensor, t: int):
    return phi.clone(), torch.ones(phi.numel() // BLOCK, dtype=torch.bool)


def lattice(bits: int, margin: float, fix: int = 0) -> Code:
    """``fix``: a block with at most this many values on the wrong grid point is repaired (a
    linear check, sums of the indices with distinct weights, would locate one such value)."""
    half = 2 ** (bits - 1) - 1

    def code(phi, ref, spread, t):
        s = (margin * spread / half).clamp_min(1e-6).repeat_interleave(BLOCK)
        q = torch.round(phi / s)
        mod = 2**bits
        # the receiver: the grid point with q's residue nearest to its own phi
        base = torch.round(ref / s)
        r = torch.remainder(q - base, mod)
        r = torch.where(r > mod // 2, r - mod, r)
        got = base + r
        wrong = (got != q).view(-1, BLOCK).sum(1)
        ok = wrong <= fix
        return torch.where(ok.repeat_interleave(BLOCK), q, got) * s, ok

    return code


def subsample(fraction: float) -> Code:
    def code(phi, ref, spread, t):
        g = torch.Generator().manual_seed(t)
        ok = torch.rand(phi.numel() // BLOCK, generator=g) < fraction
        return phi.clone(), ok

    return code


def bound(rate: float) -> Code:
    gen = torch.Generator().manual_seed(1)

    def code(phi, ref, spread, t):
        d = (phi - ref).view(-1, BLOCK)
        sd = d.pow(2).mean(1, keepdim=True).sqrt() * 2 ** (-rate)
        noise = torch.randn(d.shape, generator=gen) * sd
        return phi + noise.view(-1), torch.ones(d.shape[0], dtype=torch.bool)

    return code


def run(code: Code, *, sites: int = 4, rounds: int = 300, dim: int = 4096, seed: int = 0,
        decay: float = 0.5) -> tuple[float, float]:  # fmt: skip
    """(consensus distance, failed block fraction) over the second half of the rounds.
    ``decay``: per round, of the largest partner difference a site remembers per block."""
    rng = np.random.default_rng(seed)
    step = NoLoCo(alpha=0.9, beta=0.7, gamma=1.0, consensus="weights", nesterov=True)
    states = [OuterState.start(torch.zeros(dim)) for _ in range(sites)]
    nb = dim // BLOCK
    spread = [torch.full((nb,), 1.0) for _ in range(sites)]  # a generous first window
    dist, fails = [], []
    for t in range(rounds):
        noise = torch.from_numpy(rng.standard_normal((sites, dim)).astype(np.float32))
        perm = rng.permutation(sites)
        phis = [s.phi.clone() for s in states]
        for k in range(sites // 2):
            i, j = int(perm[k]), int(perm[k + sites // 2])
            dec_j, ok_j = code(phis[j], phis[i], spread[j], t)  # j's phi as i decodes it
            dec_i, ok_i = code(phis[i], phis[j], spread[i], t)
            ok_b = ok_i & ok_j
            ok = ok_b.repeat_interleave(BLOCK)
            # a failed block: no pull there on either side (both keep their own phi)
            for me, own, seen in ((i, dec_i, dec_j), (j, dec_j, dec_i)):
                own = torch.where(ok, own, phis[me])
                seen = torch.where(ok, seen, phis[me])
                diff = (seen - phis[me]).abs().view(-1, BLOCK).amax(1)
                # as lattice.Spread (decay 1/2): the largest difference seen; a failed block x4
                spread[me] = torch.where(
                    ok_b, torch.maximum(diff, spread[me] * decay), spread[me] * 4
                )
                try:
                    step.apply(torch.empty(dim), states[me], [noise[i], noise[j]], [own, seen], own)
                except ValueError:  # the spread ran away past the float range
                    return math.inf, math.nan
            if t >= rounds // 2:
                dist.append(float((phis[i] - phis[j]).pow(2).mean().sqrt()))
                fails.append(1.0 - float(ok_b.float().mean()))
    return float(np.mean(dist)), float(np.mean(fails))


def rows() -> list[tuple[str, Code, float, float]]:
    """(name, code, bits per value, decay of the remembered spread)."""
    out: list[tuple[str, Code, float, float]] = [("exact", exact, 32.0, 0.5)]
    for bits, margin in ((8, 8), (4, 2), (3, 2), (3, 1.5), (2, 1.5), (2, 1.0)):
        out.append((f"lattice {bits} bits, margin {margin}", lattice(bits, margin),
                    bits + BLOCK_BITS / BLOCK, 0.5))  # fmt: skip
    for bits, margin, fix in ((4, 2, 0), (4, 1.5, 1), (3, 1.5, 1)):
        out.append((f"lattice {bits} bits, margin {margin}, decay 0.9, {fix} repaired",
                    lattice(bits, margin, fix), bits + BLOCK_BITS / BLOCK, 0.9))  # fmt: skip
    for f in (0.5, 0.05):
        out.append((f"subsample {f} of the blocks, exact", subsample(f), 32 * f, 0.5))
    for rate in (3.0, 2.0, 1.6, 1.4, 1.0):
        out.append((f"bound at {rate} bits", bound(rate), rate + BLOCK_BITS / BLOCK, 0.5))
    return out


def main() -> None:
    ref, _ = run(exact)
    for name, code, bits, decay in rows():
        d, failed = run(code, decay=decay)
        print(json.dumps({"code": name, "bytes_per_value": round(bits / 8, 3),
                          "distance": round(d, 4), "vs_exact": round(d / ref, 3),
                          "failed_blocks": round(failed, 4),
                          "finite": math.isfinite(d)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
