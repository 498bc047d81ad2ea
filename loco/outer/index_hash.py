"""Fixed randomness per flat index: splitmix64's finalizer of ``index + seed``.

Every site and every rank count computes the same values for an index, and neighbouring indices
get independent-looking bits (a plain multiplicative hash of consecutive indices gives
low-discrepancy bits: its sign sums over a block stay near zero, and its bits line up with
Hadamard rows).
"""

from __future__ import annotations

import numpy as np

_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def splitmix(lo: int, n: int, seed: int) -> np.ndarray:
    """The mix of every index ``lo .. lo + n - 1`` plus ``seed`` (uint64)."""
    h = np.arange(lo, lo + n, dtype=np.uint64) + np.uint64(seed)
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(_MIX[0])
        h = (h ^ (h >> np.uint64(27))) * np.uint64(_MIX[1])
        return h ^ (h >> np.uint64(31))
