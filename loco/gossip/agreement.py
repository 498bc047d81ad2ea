"""Pairing under disagreeing views: a group stands only where all its members proposed it.

With SWIM every site has its own live view; two views that differ give different
``pairing(seed, round, view)`` results, so A may pick B while B picks C. Each site therefore
proposes the group its own view gives (:func:`propose`), sends the proposal to the other
members, and keeps the group only when every other member's proposal for the same round is
exactly that group (:func:`settle`); otherwise it steps alone (n = 1) that round. A site serves
or pulls a round's payload only for members of its settled group, so nobody averages with a
site that did not agree, and every member of a settled group computes the same means.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pairing import group_of, pairing

MAX_GROUP = 3  # pairs, and one triple when the count is odd
MAX_NAME = 128  # characters of one site name in a proposal from a peer


@dataclass(frozen=True)
class Proposal:
    """``site`` proposes ``group`` (sorted names, itself included) for ``round``."""

    site: str
    round: int
    group: tuple[str, ...]

    def valid(self) -> bool:
        """Bounded and self-consistent (a hostile proposal is ignored, never trusted)."""
        g = self.group
        return (
            0 < len(g) <= MAX_GROUP
            and all(0 < len(s) <= MAX_NAME for s in g)
            and self.site in g
            and list(g) == sorted(set(g))
            and self.round >= 0
        )


def propose(
    seed: int,
    round: int,
    view: list[str],
    site: str,
    odd: str = "triple",
    roster: list[str] | None = None,
    mode: str = "random",
    key: int | None = None,
) -> Proposal:
    """The group this site's own view gives for ``round``: the pairing (``mode``) of meeting
    ``key`` (default ``round``; the rounds between meetings have no pairing, so the meetings
    are numbered on their own: ``loco.outer.schedule.Meetings``).

    Without ``roster``: the matching of the live ``view``; one name missing from one view
    reshuffles every pair, so any disagreement anywhere breaks pairs everywhere. With
    ``roster`` (every member ever known, dead ones included, which changes only on joins): the
    matching of the roster, less the members dead in this view; a site whose roster partners are
    all dead is an orphan and is matched among the orphans (a second matching). A disagreement
    about one member then touches only its own group and the orphans.
    """
    key = round if key is None else key
    if roster is None:
        return Proposal(site, round, group_of(site, pairing(seed, key, view, odd, mode)))
    live = set(view) | {site}
    groups = pairing(seed, key, sorted(set(roster) | {site}), odd, mode)
    mine = tuple(s for s in group_of(site, groups) if s in live)
    if len(mine) > 1:
        return Proposal(site, round, mine)
    orphans = [g[0] for g in ([s for s in g if s in live] for g in groups) if len(g) == 1]
    # the orphans' matching draws from another stream than the roster's (round -1 - key)
    return Proposal(site, round, group_of(site, pairing(seed, -1 - key, orphans, odd)))


def settle(mine: Proposal, received: dict[str, Proposal]) -> tuple[str, ...]:
    """The group this site uses: ``mine.group`` if every other member proposed exactly it for
    the same round, else ``(mine.site,)``. ``received``: proposals by sender name (missing ones,
    late ones and invalid ones count as disagreement)."""
    for other in mine.group:
        if other == mine.site:
            continue
        p = received.get(other)
        if p is None or not p.valid() or p.site != other:
            return (mine.site,)
        if p.round != mine.round or p.group != mine.group:
            return (mine.site,)
    return mine.group


def settle_all(
    seed: int,
    round: int,
    views: dict[str, list[str]],
    odd: str = "triple",
    roster: list[str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Every site's settled group when all proposals arrive (a reference for tests and the
    simulator's loss-free case): ``views`` maps each site to its own live view."""
    props = {s: propose(seed, round, v, s, odd, roster) for s, v in views.items()}
    return {s: settle(p, props) for s, p in props.items()}
