"""NoLoCo pairing: a random perfect matching of the live sites, identical everywhere.

``pairing(seed, round, live_sites)`` depends only on (seed, round, sorted set of names), so
every site computes the same groups without any message. The permutation is a Fisher-Yates
shuffle whose draws come from SHA-256 of ``"loco-pairing/{seed}/{round}/{i}"`` (portable: a
NumPy or any-language reference reproduces it exactly); consecutive names are then paired.
With an odd count, ``odd="triple"`` (default) merges the last three into one group, and
``odd="sit_out"`` leaves the last one alone (it does the local step, n = 1).

``mode="hypercube"`` (``gossip.pairing``): with ``2**k`` names, one shuffle of them for the
whole run (``permutation(seed, 0, names)``: name at position ``i``) and meeting ``round`` pairs
position ``i`` with ``i XOR 2**d``, ``d = (round - 1) % k``: any ``k`` meetings in a row are
the ``k`` dimensions of a hypercube, after which, were nothing to move in between, every site
would hold the mean of all (random matchings repeat a matching or half of one). Any other
count, or a round below 1 (the orphans' second matching), pairs at random as above.
"""

from __future__ import annotations

import functools
import hashlib

ODD_POLICIES = ("triple", "sit_out")
MODES = ("random", "hypercube")


def _draw(seed: int, round: int, i: int) -> int:
    digest = hashlib.sha256(f"loco-pairing/{seed}/{round}/{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def permutation(seed: int, round: int, names: list[str]) -> list[str]:
    """Deterministic shuffle of ``sorted(set(names))`` for (seed, round)."""
    out = sorted(set(names))
    for i in range(len(out) - 1, 0, -1):
        j = _draw(seed, round, i) % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def pairing(
    seed: int, round: int, live_sites: list[str], odd: str = "triple", mode: str = "random"
) -> list[tuple[str, ...]]:
    """Groups of the round: pairs (plus one triple or one single when the count is odd).

    Each group is a sorted tuple; groups are sorted by their first name. Every live site is
    in exactly one group.
    """
    if odd not in ODD_POLICIES:
        raise ValueError(f"odd={odd!r}; allowed: {ODD_POLICIES}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {MODES}")
    return list(_pairing(seed, round, tuple(sorted(set(live_sites))), odd, mode))


def _hypercube(seed: int, round: int, names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    perm = permutation(seed, 0, list(names))
    bit = 1 << ((round - 1) % (len(names).bit_length() - 1))
    groups = (tuple(sorted((perm[i], perm[i ^ bit]))) for i in range(len(perm)) if not i & bit)
    return tuple(sorted(groups, key=lambda g: g[0]))


@functools.lru_cache(maxsize=64)
def _pairing(
    seed: int, round: int, names: tuple[str, ...], odd: str, mode: str = "random"
) -> tuple[tuple[str, ...], ...]:
    n = len(names)
    if mode == "hypercube" and round >= 1 and n >= 2 and not n & (n - 1):
        return _hypercube(seed, round, names)
    perm = permutation(seed, round, list(names))
    groups = [tuple(perm[i : i + 2]) for i in range(0, len(perm) - len(perm) % 2, 2)]
    if len(perm) % 2:
        last = perm[-1]
        if odd == "triple" and groups:
            groups[-1] = groups[-1] + (last,)
        else:
            groups.append((last,))
    return tuple(sorted((tuple(sorted(g)) for g in groups), key=lambda g: g[0]))


def group_of(site: str, groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The group containing ``site`` (``(site,)`` if it is not live)."""
    for g in groups:
        if site in g:
            return g
    return (site,)


def partners(
    seed: int, round: int, live_sites: list[str], site: str, odd: str = "triple",
    mode: str = "random",
) -> list[str]:  # fmt: skip
    """The other members of ``site``'s group this round (empty: local round, n = 1)."""
    return [s for s in group_of(site, pairing(seed, round, live_sites, odd, mode)) if s != site]
