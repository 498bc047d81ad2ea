"""Which rank owns which range of the flat vector: the one rule, shared by the engine and gossip.

A group of ``nproc`` ranks splits a flat vector of length ``flat_size`` into contiguous ranges:
rank ``r`` owns ``[r*P//N, (r+1)*P//N)``. Both users apply it to the *padded* size:

- the engine (:meth:`loco.engine.flat.FlatLayout.shard_range`) passes ``padded_numel(world)``, a
  multiple of ``world * ALIGN``, so every shard has the same size ``S = padded // world`` and the
  rule reduces to ``[r*S, (r+1)*S)``;
- the gossip layer (:class:`loco.gossip.GossipServer`, :class:`loco.gossip.GossipClient`) is
  given ``flat_size = padded_numel(nproc)`` by ``loco.build``, so it computes the same shards and
  a partner's rank table agrees with its engine.

Keeping the rule in this one module (a utility both leaves may import) is what makes the two
agree by construction, not by coincidence.
"""

from __future__ import annotations


def rank_range(flat_size: int, nproc: int, rank: int) -> tuple[int, int]:
    """Range ``[rank*P//N, (rank+1)*P//N)`` owned by ``rank`` of a site with ``nproc`` ranks."""
    if not 0 <= rank < nproc:
        raise ValueError(f"rank {rank} not in [0, {nproc})")
    return rank * flat_size // nproc, (rank + 1) * flat_size // nproc


def owners(flat_size: int, nproc: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Ranks whose range intersects ``[lo, hi)``, as ``(rank, a, b)`` with the intersection.

    In rank order. Starts at the first rank that can own ``lo`` (``lo*N//P``: every rank before
    it ends at or before ``lo``) and stops at the first rank that starts at or after ``hi``.
    """
    out: list[tuple[int, int, int]] = []
    if flat_size <= 0 or lo >= hi:
        return out
    for r in range(max(0, lo * nproc // flat_size), nproc):
        rlo, rhi = rank_range(flat_size, nproc, r)
        if rlo >= hi:
            break
        a, b = max(lo, rlo), min(hi, rhi)
        if a < b:
            out.append((r, a, b))
    return out
