"""Flat-space arithmetic: which rank owns which range of the flat vector."""

from __future__ import annotations


def rank_range(flat_size: int, nproc: int, rank: int) -> tuple[int, int]:
    """Range ``[rank*P//N, (rank+1)*P//N)`` owned by ``rank`` of a site with ``nproc`` ranks."""
    if not 0 <= rank < nproc:
        raise ValueError(f"rank {rank} not in [0, {nproc})")
    return rank * flat_size // nproc, (rank + 1) * flat_size // nproc


def owners(flat_size: int, nproc: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Ranks whose range intersects ``[lo, hi)``, as ``(rank, a, b)`` with the intersection."""
    out = []
    for r in range(nproc):
        rlo, rhi = rank_range(flat_size, nproc, r)
        a, b = max(lo, rlo), min(hi, rhi)
        if a < b:
            out.append((r, a, b))
    return out


def split_range(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[lo, hi)`` into at most ``parts`` contiguous non-empty pieces."""
    n = hi - lo
    parts = max(1, min(parts, n))
    return [(lo + i * n // parts, lo + (i + 1) * n // parts) for i in range(parts)]
