"""The outer loop's statistics: one ``outer`` record per round, run totals and history.

With streaming fragments there is one record per fragment's sync: ``round`` is its round,
``fragment`` its fragment, and every figure (bytes, stall, utilization since the previous
record, consensus distance over the fragment's values) is that sync's.

Every figure is summed over the site's ranks (:meth:`OuterStats.site_sum`, collective when the
site has more than one rank), so rank 0's record describes the whole site. The gossip figures
(bytes, ``fail_<cause>``, retries, strikes, bans) are the node's counters since the previous
record (``GossipNode.round_metrics``).
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import torch

from loco.site_comm import SiteComm

# agree_*: the pairing agreement (loco.gossip.agree_rpc)
# window_slack_*: loco.outer.lattice.window_slack of the lattice frames decoded
_GOSSIP_KEYS = ("retries", "strikes", "bans", "agree_bytes", "agree_seconds",
                "repaired_lattice_blocks", "window_slack_bits", "window_slack_sq",
                "window_slack_blocks")  # fmt: skip


def mean_crc(ts: tuple[torch.Tensor, ...]) -> int:
    """CRC-32 of the bytes of the group means: equal on every member of a group."""
    crc = 0
    for t in ts:
        crc = zlib.crc32(t.contiguous().numpy().tobytes(), crc)
    return crc


class OuterStats:
    """Records of one rank's outer rounds (``history``), the run's ``totals``, and rank 0's
    ``outer`` lines in metrics.jsonl.

    Args:
        node: the rank's ``GossipNode`` (None: no gossip figures).
        comm: the site's ranks (``SiteComm``; figures are summed over them).
        metrics: rank 0's ``MetricsWriter`` (None on the other ranks).
        all_live: DiLoCo (the phi mean is the same on every site: ``mean_crc`` covers the delta
            mean only).
    """

    def __init__(self, *, node: Any = None, comm: SiteComm | None = None, metrics: Any = None,
                 all_live: bool = False) -> None:  # fmt: skip
        self.node, self.comm = node, comm if comm is not None else SiteComm.single()
        self.metrics, self.all_live = metrics, all_live
        self.history: list[dict[str, Any]] = []
        # own_bytes_sent: what this rank's server sent; hello_bytes: the Hello messages (requests
        # and answers, protobuf bytes) of this rank's heartbeats and partner lookups; the others
        # are sums over the site
        self.totals: dict[str, Any] = {"bytes_sent": 0.0, "bytes_recv": 0.0, "rounds": 0,
                                       "dropped": 0, "own_bytes_sent": 0.0,
                                       "hello_bytes": 0.0, "swim_bytes": 0.0}  # fmt: skip
        self._mark = time.perf_counter()  # end of the previous round (utilization window)
        self._stall = 0.0  # seconds training was blocked by rounds in the window

    def restart(self) -> None:
        """Open the utilization window now (after the start-up wait)."""
        self._mark = time.perf_counter()

    def site_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the site's ranks (float64; collective when world > 1)."""
        return self.comm.sum(values)

    def gossip_sums(self, extra: tuple[float, ...] = ()) -> list[float]:
        """``[bytes_sent, bytes_recv, *extra]`` summed over the site's ranks, the bytes being
        the gossip traffic since the previous record; the bytes are added to the totals.
        Collective."""
        g = self.node.round_metrics() if self.node is not None else {}
        sums = self.site_sum([g.get("bytes_sent", 0.0), g.get("bytes_recv", 0.0), *extra])
        self.totals["own_bytes_sent"] += g.get("bytes_sent", 0.0)
        self.totals["hello_bytes"] += g.get("hello_bytes", 0.0)
        self.totals["swim_bytes"] += g.get("swim_bytes", 0.0)
        self.totals["bytes_sent"] += sums[0]
        self.totals["bytes_recv"] += sums[1]
        return sums

    def round(self, r: Any, ok: dict[str, Any], sq: float, cnt: float, end: float,
              means: tuple[torch.Tensor, ...]) -> dict[str, Any]:  # fmt: skip
        """Record merged round ``r`` (a ``loco.outer.round.Round``): ``ok`` the partners used,
        ``sq`` / ``cnt`` this rank's squared phi distance to them and its element count,
        ``end`` the merge's end (``perf_counter``), ``means`` the group means. Collective."""
        g = self.node.round_metrics() if self.node is not None else {}
        n = 1 + len(ok)
        miss = getattr(r, "land_miss", None) if getattr(r, "land", None) is not None else None
        miss_sq = float(miss.double().pow(2).sum()) if miss is not None else 0.0
        miss_cnt = float(miss.numel()) if miss is not None else 0.0
        sent, recv, sq_all, cnt_all, n_sum, dropped, miss_sq, miss_cnt = self.site_sum(
            [g.get("bytes_sent", 0.0), g.get("bytes_recv", 0.0), sq, cnt, n,
             float(n < 1 + len(r.partners)), miss_sq, miss_cnt]
        )  # fmt: skip
        wall = end - self._mark
        util = max(0.0, wall - self._stall - r.stall) / wall if wall > 0 else 1.0
        self._mark, self._stall = end, 0.0
        self.totals["bytes_sent"] += sent
        self.totals["bytes_recv"] += recv
        self.totals["own_bytes_sent"] += g.get("bytes_sent", 0.0)
        self.totals["hello_bytes"] += g.get("hello_bytes", 0.0)
        self.totals["swim_bytes"] += g.get("swim_bytes", 0.0)
        self.totals["rounds"] += 1
        self.totals["dropped"] += int(dropped > 0)
        rec = dict(
            partner=",".join(r.partners),
            n=n,
            n_mean=n_sum / self.comm.world,
            dropped=",".join(f"{p}:{c}" for p, (d, ph, c) in r.pulled.items() if p not in ok),
            bytes_sent=sent,
            bytes_recv=recv,
            round_seconds=end - r.started,
            stall_seconds=r.stall,
            consensus_distance=(sq_all / cnt_all) ** 0.5 if cnt_all else None,
            compute_utilization=util,
            window_seconds=wall,  # the utilization's window: since the previous merge
            mean_crc=mean_crc(means[:1] if self.all_live else means),
        )
        if miss_cnt:  # the landing's miss this site knows: its coding error over n (leader), its
            # offset's (follower); RMS over the site's values
            rec["landing_miss"] = (miss_sq / miss_cnt) ** 0.5
        if r.fragment is not None:  # a streaming fragment's sync (``round`` is its round)
            rec["fragment"] = r.fragment
        if r.closing:  # its tail's sync at the last step: not a round of the run
            rec["closing"] = True
        for k, v in g.items():
            if k.startswith("fail_") or k in _GOSSIP_KEYS:
                rec[k] = v
        self.history.append({"step": r.step, "round": r.t, **rec})
        self.log(r.step, r.t, rec)
        return rec

    def log(self, step: int, round: int, rec: dict[str, Any]) -> None:
        """Write one ``outer`` line (rank 0 only: the ranks without a writer skip it)."""
        if self.metrics is not None:
            self.metrics.log("outer", step=step, round=round, **rec)
