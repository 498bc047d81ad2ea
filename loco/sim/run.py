"""The simulated rounds: inner SGD on a quadratic, agreement on pairs, the real outer step.

Round ``r`` of a site starts when its previous round finished; it computes for ``compute_s``
(times ``straggler_x`` when it straggles), then proposes the group its own SWIM view gives.
A group stands where every member proposed it and every two members' waits overlap
(``|ready_a - ready_b| + latency <= pull_timeout_s``: the later one's proposal reaches the
earlier one before it gives up, and the earlier one still serves); otherwise each member steps
alone. Members of a group pull each other's delta and phi (fp32, ``2 * params * 4`` bytes per
partner) and apply :class:`loco.outer.methods.NoLoCo` exactly as a real site does. Views are
taken at the earliest ready time of the round (the membership network runs up to it).
DiLoCo (``method=diloco``) averages over all live sites behind a barrier; the ring and tree
all-reduce times of that barrier are computed every round on the same links and draws.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from loco.gossip.agreement import Proposal, propose, settle
from loco.outer.methods import OuterState, build_outer

from .links import LinkModel, ring_allreduce_s, tree_allreduce_s
from .membership import SimMembership
from .options import SimOptions
from .quadratic import Quadratic

PROPOSAL_BYTES = 64  # a proposal on the wire: round, group names, signature (upper bound)


class Federation:
    """The sites' outer states and clocks; ``round(r)`` runs one round of every live site."""

    def __init__(self, o: SimOptions) -> None:
        self.o = o
        self.np_rng = np.random.default_rng(o.seed)
        self.names = [f"s{i}" for i in range(o.sites)]
        self.links = LinkModel(o.sites, rng=self.np_rng, lat_ms=o.lat_ms, lat_sigma=o.lat_sigma,
                               bw_gbps=o.bw_gbps, bw_sigma=o.bw_sigma)  # fmt: skip
        self.net = SimMembership(self.names, self.links, period_s=o.heartbeat_s, loss=o.drop,
                                 seed=o.seed)  # fmt: skip
        self.model = Quadratic(o.sites, o.dim, hetero=o.hetero, seed=o.seed)
        # NoLoCo as the spec writes it; DiLoCo with torch's Nesterov SGD (momentum 0.9)
        kw = {"lr": o.outer_lr, "momentum": 0.9, "nesterov": True} if o.method == "diloco" else {}
        self.outer = build_outer(o.method, alpha=o.alpha, beta=o.beta, gamma=o.gamma, **kw)
        x0 = self.model.start()
        self.states = [OuterState.start(x0) for _ in self.names]
        self.finish = np.zeros(o.sites)
        self.alive = np.ones(o.sites, dtype=bool)
        self.payload = 2 * o.params * 4
        self.killed: list[int] = []
        self._proposals: dict[tuple, dict[str, Proposal]] = {}

    # -- failures ------------------------------------------------------------------------
    def failures(self, r: int) -> None:
        o = self.o
        if o.kill and r == o.kill_round:
            self.killed = sorted(self.np_rng.choice(o.sites, o.kill, replace=False).tolist())
            for i in self.killed:
                self.alive[i] = False
                self.net.kill(self.names[i])
        if o.restart and r == o.kill_round + o.restart_after:
            now = float(self.finish[self.alive].min())
            self.net.advance(now)
            for i in self.killed[: o.restart]:
                self.alive[i] = True
                self.finish[i] = now  # resumes from its last state, as from a checkpoint
                self.net.restart(self.names[i], now, incarnation=r + 1)

    # -- one round -----------------------------------------------------------------------
    def groups(self, r: int, ready: np.ndarray, live: list[int]) -> dict[int, tuple[tuple, tuple]]:
        """Each live site's (settled group, proposed group), as site indices."""
        o = self.o
        if o.method == "local":
            return {i: ((i,), (i,)) for i in live}
        props: dict[str, Proposal] = {}
        for i in live:
            name = self.names[i]
            if o.method == "diloco":
                props[name] = Proposal(name, r, tuple(sorted(self.names[j] for j in live)))
                continue
            m = self.net.members[name]
            key = (tuple(m.live()), tuple(m.roster()))
            if key not in self._proposals:
                self._proposals[key] = {}
            cached = self._proposals[key]
            if name not in cached:
                cached[name] = propose(o.seed, r, list(key[0]), name, roster=list(key[1]))
            props[name] = cached[name]
        out = {}
        for i in live:
            mine = props[self.names[i]]
            heard = {}
            for other in mine.group:
                if other in props and self._overlap(i, int(other[1:]), ready):
                    heard[other] = props[other]
            settled = settle(mine, heard) if o.method == "noloco" else mine.group
            out[i] = (tuple(int(s[1:]) for s in settled), tuple(int(s[1:]) for s in mine.group))
        return out

    def _overlap(self, i: int, j: int, ready: np.ndarray) -> bool:
        wait = abs(ready[i] - ready[j]) + self.links.latency(i, j)
        return wait <= self.o.pull_timeout_s

    def finish_time(self, i: int, g: tuple[int, ...], proposed: tuple[int, ...],
                    ready: np.ndarray) -> float:  # fmt: skip
        """When site i ends the round: after its pulls, or after learning it is alone."""
        if len(g) > 1:
            others = [j for j in g if j != i]
            lat = max(self.links.latency(i, j) for j in others)
            bw = min(self.links.bandwidth(i, j) for j in others)
            return float(ready[list(g)].max() + lat + len(others) * self.payload / bw)
        if len(proposed) == 1:
            return float(ready[i])
        # a partner that proposed another group, or gave up already, says so when it is ready
        # (at once if it is ready first); one that never comes (dead, or later than the
        # timeout) is waited for until the timeout
        limit = self.o.pull_timeout_s
        t = float(ready[i])
        for j in proposed:
            if j == i:
                continue
            if not self.alive[j] or ready[j] > ready[i] + limit:
                wait = limit
            else:
                wait = min(max(0.0, ready[j] - ready[i]) + self.links.latency(i, j), limit)
            t = max(t, float(ready[i]) + wait)
        return t

    def apply(self, groups: dict[int, tuple[int, ...]], deltas: dict[int, torch.Tensor]) -> None:
        """The real outer step of every site over its group (its own values first)."""
        done: dict[tuple[int, ...], OuterState] = {}
        before = {i: self.states[i].phi.clone() for i in groups}
        for i, g in groups.items():
            order = [i] + [j for j in g if j != i]
            if self.o.method == "diloco" and g in done:  # every member computes the same
                src = done[g]
                self.states[i] = OuterState(src.phi.clone(), src.momentum.clone(), src.rounds)
                continue
            phis = [before[j] for j in order]
            theta = self.states[i].phi.clone()
            self.outer.apply(theta, self.states[i], [deltas[j] for j in order], phis)
            done[g] = self.states[i]

    def round(self, r: int) -> dict[str, float]:
        """One round of every live site; returns its figures."""
        o = self.o
        self.failures(r)
        live = np.flatnonzero(self.alive).tolist()
        self._proposals = {}
        slow = self.np_rng.random(o.sites) < o.straggler_p
        compute = o.compute_s * np.where(slow, o.straggler_x, 1.0)
        ready = self.finish + compute
        self.net.advance(float(ready[live].min()))
        deltas = self.model.inner(live, {i: self.states[i].phi for i in live}, o, r)
        groups = self.groups(r, ready, live)
        if o.method == "diloco":  # behind a barrier, the tree all-reduce on the same links
            end = float(ready[live].max()) + tree_allreduce_s(self.links, live, o.params * 4)
            new = {i: end for i in live}
        else:
            new = {i: self.finish_time(i, g, n, ready) for i, (g, n) in groups.items()}
        self.apply({i: g for i, (g, _) in groups.items()}, deltas)
        sync = [new[i] - ready[i] for i in live]
        for i, t in new.items():
            self.finish[i] = t
        paired = [i for i, (g, _) in groups.items() if len(g) > 1]
        return {
            "sync_s": float(np.mean(sync)),
            "barrier_compute_s": float(compute[live].max()),
            "ring_s": ring_allreduce_s(self.links, live, o.params * 4),
            "tree_s": tree_allreduce_s(self.links, live, o.params * 4),
            "paired": len(paired) / len(live),
            "payload_bytes": sum(self.payload * (len(groups[i][0]) - 1) for i in live) / len(live),
            "proposal_bytes": sum(PROPOSAL_BYTES * (len(groups[i][1]) - 1) for i in live)
            / len(live),
            "consensus": self.consensus(live),
            "objective": self.model.loss([self.states[i].phi for i in live]),
        }

    def consensus(self, live: list[int]) -> float:
        """RMS over sites and coordinates of phi minus the live sites' mean phi."""
        phis = torch.stack([self.states[i].phi for i in live])
        return float((phis - phis.mean(0)).pow(2).mean().sqrt())


def simulate(o: SimOptions) -> dict:
    """Run ``o.rounds`` rounds; one JSON-ready summary (per-round series included)."""
    t0 = time.perf_counter()
    fed = Federation(o)
    rows = [fed.round(r) for r in range(o.rounds)]
    live = int(fed.alive.sum())
    makespan = float(fed.finish[fed.alive].max())
    member_bytes = float(fed.net.bytes_sent.sum()) / o.sites / o.rounds
    ring_round = float(np.mean([x["barrier_compute_s"] + x["ring_s"] for x in rows]))
    tree_round = float(np.mean([x["barrier_compute_s"] + x["tree_s"] for x in rows]))
    sync = float(np.mean([x["sync_s"] for x in rows]))
    tree = float(np.mean([x["tree_s"] for x in rows]))
    return {
        "sites": o.sites,
        "rounds": o.rounds,
        "method": o.method,
        "live_at_end": live,
        "round_s": makespan / o.rounds,
        "sync_s": sync,
        "ring_allreduce_s": float(np.mean([x["ring_s"] for x in rows])),
        "tree_allreduce_s": tree,
        "diloco_ring_round_s": ring_round,
        "diloco_tree_round_s": tree_round,
        "sync_speedup_vs_tree": tree / sync if sync > 0 else None,
        "round_speedup_vs_tree": tree_round / (makespan / o.rounds),
        "paired_fraction": float(np.mean([x["paired"] for x in rows])),
        "bytes_per_site_round": {
            "payload": float(np.mean([x["payload_bytes"] for x in rows])),
            "membership": member_bytes,
            "proposals": float(np.mean([x["proposal_bytes"] for x in rows])),
            "ring_allreduce": 2 * (live - 1) / live * o.params * 4,
            "tree_allreduce_max": 3 * 2 * o.params * 4,
        },
        "consensus": [round(x["consensus"], 6) for x in rows],
        "objective": [round(x["objective"], 6) for x in rows],
        "wall_s": round(time.perf_counter() - t0, 2),
        "options": vars(o),
    }
