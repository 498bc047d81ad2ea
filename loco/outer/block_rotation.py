"""A fixed random rotation of every block of values: signs, then an orthonormal Hadamard
transform (the randomized Hadamard transform).

Partners' phis differ unevenly inside a block: a few values of a block may carry most of its
difference, so a grid whose window covers the block's largest difference is coarse for the
rest. Rotated, every coordinate of a block is a random-sign sum of all its values: the
difference is spread evenly (about Gaussian, largest value ~3x the rms for 256 values) while
its norm is kept. The lattice (``loco.outer.lattice``) codes phi in the rotated coordinates
when a frame says so; its grid error, rotated back, is spread over the block too.

The signs are a fixed hash of the position inside the block (the same for every block, site
and rank count). ``rotate`` and ``unrotate`` are exact inverses up to fp32 rounding, and
elementwise on rows: the same row gives the same bits whatever the other rows are, so the
sender and its partners compute identical values from identical grid points.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from loco.outer.index_hash import splitmix

_SEED = 0x9E3779B97F4A7C15


def is_power_of_two(block: int) -> bool:
    """Whether ``block`` can be rotated (a Hadamard transform needs a power of two)."""
    return block >= 1 and block & (block - 1) == 0


def position_hash(block: int, seed: int) -> np.ndarray:
    """A splitmix64 mix of every position ``0 .. block - 1`` plus ``seed`` (uint64): fixed
    per-position randomness (the rotation's signs, the lattice check's constants)."""
    return splitmix(0, block, seed)


@lru_cache(maxsize=8)
def _signs(block: int) -> torch.Tensor:
    """+-1.0 per position: the top bit of a splitmix64 mix of the position (a plain
    multiplicative hash of consecutive positions lines up with Hadamard rows)."""
    bit = (position_hash(block, _SEED) >> np.uint64(63)).astype(np.float32)
    return torch.from_numpy(1.0 - 2.0 * bit)


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform of every row of ``x`` ([rows, block])."""
    rows, block = x.shape
    y = x
    h = 1
    while h < block:
        y = y.reshape(rows, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(rows, block) * (1.0 / float(np.sqrt(block)))


def rotate(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ([nblocks, block], fp32, block a power of two) with its first ``rows`` rows
    rotated (the rest, a partial last block, as they are): a copy, or ``x`` itself when
    ``rows`` is 0 (callers only read the result)."""
    if rows <= 0:
        return x
    out = x.clone()
    out[:rows] = _hadamard(x[:rows] * _signs(x.shape[1]))
    return out


def unrotate(y: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of :func:`rotate` (the transform is symmetric and its own inverse); ``y``
    itself when ``rows`` is 0."""
    if rows <= 0:
        return y
    out = y.clone()
    out[:rows] = _hadamard(y[:rows]) * _signs(y.shape[1])
    return out
