"""The final average (``outer.final_average``, NoLoCo only), after the last inner step.

Every site publishes its weights raw (stream ``final``, round ``last // H + 1``), pulls every
other live site's, and sets ``theta = phi =`` their mean in site order: the sites end with one
model, at the cost of one exact copy of the weights per peer, once per run. Implausible weights
(``loco.outer.plausible.implausible_phi``) earn a strike and are left out; a site that does not
answer in time is left out too, on every rank of the site alike (the ranks agree on who
answered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from loco.outer.exchange import RangePayloads
from loco.outer.flat_view import FlatView
from loco.outer.methods import OuterState
from loco.outer.plausible import implausible_phi
from loco.outer.stats import OuterStats, mean_crc

log = logging.getLogger("loco.outer.loop")  # the outer loop's log lines, as before the split

FINAL_STREAM = "final"


class FinalAverage:
    """Runs the final average of one rank (see the module docstring).

    Args:
        flat, state: the engine's flat view and the outer state (both set to the mean).
        node, payloads: the rank's ``GossipNode`` and :class:`RangePayloads`.
        site: this site's name. live: the site's live sites (collective: rank 0's, broadcast).
        pool: the pull threads. pull_timeout_s: deadline of one pull (None: the node's).
        stats: the loop's :class:`OuterStats` (sums over the site, totals, the ``outer`` line).
        say: one line for the operator.
    """

    def __init__(self, *, flat: FlatView, state: OuterState, node: Any,
                 payloads: RangePayloads, site: str, live: Callable[[], list[str]],
                 pool: ThreadPoolExecutor, pull_timeout_s: float | None, stats: OuterStats,
                 say: Callable[[str], None]) -> None:  # fmt: skip
        self.flat, self.state, self.node, self.payloads = flat, state, node, payloads
        self.site, self.live, self.pool, self.pull_timeout_s = site, live, pool, pull_timeout_s
        self.stats, self.say = stats, say

    @torch.no_grad()
    def run(self, done: int, t: int) -> dict[str, Any]:
        """Average after inner step ``done`` as round ``t``; returns the record (the ``outer``
        line's fields plus ``peers``, the peers asked, and ``served_before``, the node's
        served-pulls mark before publishing). Collective."""
        t0 = time.perf_counter()
        theta = self.flat.master()
        own = theta.detach().float().cpu().clone()
        served = self.node.served_mark()
        self.node.publish(t, FINAL_STREAM, self.payloads.raw(own), codec="raw")
        peers = [s for s in self.live() if s != self.site]
        got = self._pull(t, own, peers)
        kept = self._agree(peers, got)
        members = sorted([(self.site, own)] + [(p, got[p][0]) for p in kept], key=lambda m: m[0])
        vals = [m[1] for m in members]
        sq = sum(float((v - own).double().pow(2).sum()) for v in vals)
        mean = torch.stack(vals).mean(0)
        theta.copy_(mean.to(theta.device, theta.dtype))
        self.state.phi.copy_(mean)
        self.flat.sync()
        sent, recv, sq_all, cnt_all = self.stats.gossip_sums((sq, float(len(kept) * own.numel())))
        left_out = [f"{p}:{got[p][1] or 'rank'}" for p in peers if p not in kept]
        rec = dict(final=True, partner=",".join(m[0] for m in members if m[0] != self.site),
                   n=len(vals), dropped=",".join(left_out), bytes_sent=sent, bytes_recv=recv,
                   round_seconds=time.perf_counter() - t0,
                   consensus_distance=(sq_all / cnt_all) ** 0.5 if cnt_all else None,
                   mean_crc=mean_crc((mean,)))  # fmt: skip
        final = {"peers": len(peers), "served_before": served, **rec}
        if left_out:
            self.say(f"final average: {', '.join(left_out)} left out; averaged {len(vals)} sites")
        self.stats.log(done, t, rec)
        return final

    def _pull(self, t: int, own: torch.Tensor, peers: list[str]) -> dict[str, Any]:
        """Every peer's weights ``(values or None, cause)``; implausible ones earn a strike."""
        jobs = {p: self.pool.submit(self.payloads.pull, self.node, p, t, FINAL_STREAM,
                                    self.pull_timeout_s, "none") for p in peers}  # fmt: skip
        got = {p: jobs[p].result() for p in peers}
        for p, (v, _) in got.items():
            if v is not None and (bad := implausible_phi(v, own)):
                log.warning("final average: %s sent implausible weights: %s", p, bad)
                self.node.strike(p, t, f"implausible final weights: {bad}")
                got[p] = (None, "implausible")
        return got

    def _agree(self, peers: list[str], got: dict[str, Any]) -> set[str]:
        """The peers that answered on every rank of the site (collective when world > 1)."""
        ok = [float(got[p][0] is not None) for p in peers]
        if peers:  # the same members on every rank of the site
            ok = self.stats.comm.min(ok)
        return {p for p, k in zip(peers, ok, strict=True) if k > 0}
