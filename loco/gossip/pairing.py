"""NoLoCo pairing: a random perfect matching of the live sites, identical everywhere.

``pairing(seed, round, live_sites)`` depends only on (seed, round, sorted set of names), so
every site computes the same groups without any message. The permutation is a Fisher-Yates
shuffle whose draws come from SHA-256 of ``"loco-pairing/{seed}/{round}/{i}"`` (portable: a
NumPy or any-language reference reproduces it exactly); consecutive names are then paired.
With an odd count, ``odd="triple"`` (default) merges the last three into one group, and
``odd="sit_out"`` leaves the last one alone (it does the local step, n = 1).
"""

from __future__ import annotations

import functools
import hashlib

ODD_POLICIES = ("triple", "sit_out")


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
    seed: int, round: int, live_sites: list[str], odd: str = "triple"
) -> list[tuple[str, ...]]:
    """Groups of the round: pairs (plus one triple or one single when the count is odd).

    Each group is a sorted tuple; groups are sorted by their first name. Every live site is
    in exactly one group.
    """
    if odd not in ODD_POLICIES:
        raise ValueError(f"odd={odd!r}; allowed: {ODD_POLICIES}")
    return list(_pairing(seed, round, tuple(sorted(set(live_sites))), odd))


@functools.lru_cache(maxsize=64)
def _pairing(
    seed: int, round: int, names: tuple[str, ...], odd: str
) -> tuple[tuple[str, ...], ...]:
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
    seed: int, round: int, live_sites: list[str], site: str, odd: str = "triple"
) -> list[str]:
    """The other members of ``site``'s group this round (empty: local round, n = 1)."""
    return [s for s in group_of(site, pairing(seed, round, live_sites, odd)) if s != site]
