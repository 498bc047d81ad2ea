"""Repairing a lattice block whose check failed: a few values that wrapped around the window.

A lattice frame (:mod:`loco.outer.lattice`) sends each grid index modulo ``2**bits`` and the
receiver picks the index with that residue nearest to its own value. Where the partners differ
by more than half the window, the pick is one window off (``+-2**bits``), and the block's
32-bit check fails. Usually only a few values of a block are that far, and they are the ones
the receiver sees nearest the window's edge: a wrapped value lands at a distance ``window -
|true distance|`` on the other side, so a value just past the edge shows up just inside it.

The check is linear in the indices (``sum(index * mul[pos]) mod 2**32``, ``mul`` fixed odd
constants per position), so moving value ``j`` by ``+-2**bits`` changes it by a known amount.
:func:`repair` tries every set of one or two of the :data:`SUSPECTS` values
nearest the edge (each moved one window across it) and keeps a block's repair only when
exactly one set makes the check agree. A repaired block is exact (its grid points are the
sender's); any other block stays failed.

What it costs the check: a block that failed is accepted wrongly when a set that is not the
true error matches. With the per-position constants of a splitmix64 hash every such set matches
with probability about ``2**-(32 - bits)``: at most 78 sets per block, ``2**-22.7`` at 3 bits,
``2**-17.7`` at 8 (against ``2**-(32 - bits)`` for the check alone).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from loco.outer.block_rotation import position_hash

SUSPECTS = 12  # the values of a failed block nearest the window's edge that a repair may move
_M32 = 0xFFFFFFFF
_SEED = 0xD1B54A32D192ED03


@lru_cache(maxsize=8)
def multipliers(block: int) -> torch.Tensor:
    """The check's odd 32-bit constant per position of a block (int64): a splitmix64 hash of
    the position. Arithmetic constants (``pos * K``) would let two moved values match two
    others whose positions have the same sum."""
    h = position_hash(block, _SEED)
    return torch.from_numpy(((h & np.uint64(_M32)) | np.uint64(1)).astype(np.int64))


def check(idx: torch.Tensor) -> torch.Tensor:
    """The 32-bit check of every row of full grid indices ``idx`` [blocks, block] (int64)."""
    return (idx * multipliers(idx.shape[1])).sum(1) & _M32


def repair(idx: torch.Tensor, ref: torch.Tensor, steps: torch.Tensor, bad: torch.Tensor,
           want: torch.Tensor, bits: int, valid: int) -> int:  # fmt: skip
    """Repair the failed rows of ``idx`` in place; returns how many were repaired (``bad`` is
    cleared for them).

    Args:
        idx: full grid indices [blocks, block] (int64), as decoded.
        ref: the receiver's own values in the grid's coordinates (fp32), same shape.
        steps: per block, the grid step (> 0).
        bad: per block, the check failed (bool); only those rows are tried.
        want: per block, the sender's check (int64, 0 <= want < 2**32).
        bits: the frame's bits per value (a move is ``2**bits``).
        valid: how many values of the flattened ``idx`` are real (the rest is padding).
    """
    rows = torch.nonzero(bad).flatten()
    if rows.numel() == 0:
        return 0
    block = idx.shape[1]
    mod = 1 << bits
    sub = idx[rows]
    off = ref[rows] / steps[rows, None] - sub.to(torch.float32)  # in steps, |off| <= mod / 2
    flat = rows[:, None] * block + torch.arange(block)[None, :]
    off = torch.where(flat < valid, off, torch.zeros_like(off))  # padding is exact: never moved
    k = min(SUSPECTS, block)
    top = off.abs().topk(k, dim=1).indices  # [F, k]
    side = torch.sign(off.gather(1, top)).to(torch.int64)  # the move: across the nearer edge
    live = side != 0
    step = (mod * side * multipliers(block)[top]) & _M32  # the check's change per move [F, k]
    need = (want[rows] - check(sub)) & _M32
    i, j = torch.triu_indices(k, k)  # every set of one (i == j) or two suspects
    moved = torch.where(i == j, step[:, i], (step[:, i] + step[:, j]) & _M32)  # [F, sets]
    hit = (moved == need[:, None]) & live[:, i] & live[:, j]
    unique = torch.nonzero(hit.sum(1) == 1).flatten()
    if unique.numel() == 0:
        return 0
    c = hit[unique].to(torch.int8).argmax(1)  # the one matching set of each repaired row
    a, b = i[c], j[c]
    r = rows[unique]
    idx[r, top[unique, a]] += mod * side[unique, a]
    two = b != a
    idx[r[two], top[unique[two], b[two]]] += mod * side[unique[two], b[two]]
    bad[r] = False
    return int(unique.numel())
