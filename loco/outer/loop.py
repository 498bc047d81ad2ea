"""The outer round driver of one rank: every ``H`` inner steps, one NoLoCo / DiLoCo / local round.

Per round ``t`` (boundary at inner step ``t * H``), on every rank of a site, on its own range::

    delta = theta - phi                                  this site's inner progress
    live  = rank 0's live sites, broadcast to the site   so every rank pairs the same way
    group = pairing(seed, t, live)   (noloco) | all live sites (diloco) | nobody (local)
    publish encode(delta + e), phi   -> this rank's mailbox
    pull the partners' delta and phi on [lo, hi)         failures: that partner is dropped
    apply (methods.py) with the DECODED values of every member, own included, in site order
    theta <- phi (or, with overlap, mix * theta_local + (1 - mix) * phi); sync_params()

A failed pull (unreachable, timeout, banned, bad payload) drops that partner for the round:
with nobody left it is the local step (n = 1); training always goes on. A bad payload never
reaches the state: it is decoded and checked before ``apply``. ``local`` never talks.

Final average (``final_average``, NoLoCo only): after the last inner step every site publishes
its weights raw (stream ``final``, round ``last + 1``), pulls every other live site's, and sets
``theta = phi =`` their mean in site order, before the final evaluation: the sites end with
one model, at the cost of one exact copy of the weights per peer, once per run. A site that
does not answer in time is left out (on every rank of the site alike).

Overlap (Streaming DiLoCo, ``tau > 0``): the boundary publishes and hands the pulls to a
background thread; training goes on for ``tau`` inner steps, then the round is merged. Training
is blocked only for encoding/publishing, for whatever of the pull is still running after
``tau`` steps, and for the update itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from loco.outer.exchange import Outgoing, RangePayloads
from loco.outer.flat import FlatView
from loco.outer.methods import OuterState, OuterStep

log = logging.getLogger(__name__)

FINAL_STREAM = "final"
SETTLE_S = 1.0  # at the end: quiet time (no pull served) before the node may close


@dataclass
class _Round:
    t: int
    step: int  # inner step of the boundary
    out: Outgoing
    partners: list[str]
    started: float
    stall: float = 0.0
    pulled: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, str]] = field(
        default_factory=dict
    )
    thread: threading.Thread | None = None
    served_before: float = 0.0


class OuterLoop:
    """Drives the outer rounds of one rank; call :meth:`on_step_end` after every inner step.

    Args:
        step: the outer update (``build_outer``).
        flat: the engine's flat view (:class:`FlatView`).
        H: inner steps per round.
        steps: the run's last inner step (the last round is merged by then).
        node: this rank's ``GossipNode`` (None for ``local``: it never talks).
        payloads: the rank's :class:`RangePayloads` (None for ``local``).
        site: this site's name.
        all_live: pull from every live site (DiLoCo) instead of the round's pairing; only the
            delta stream travels (DiLoCo's update does not use phi, equal on every site).
        tau, mix: overlap: merge ``tau`` inner steps after the boundary with
            ``theta <- mix * theta_local + (1 - mix) * phi``; ``tau = 0`` blocks.
        group, rank, world: the site's process group (live-set broadcast, metric sums).
        metrics: rank 0's ``MetricsWriter``.
        pull_timeout_s: deadline of one pull (None: the node's default).
        join_timeout_s: at start, rank 0 waits up to this long for every peer to be live.
        linger_s: at the end, wait up to this long for the partners to pull the last round.
        final_average: after the last step, average the weights over every live site (see the
            module docstring); ignored for DiLoCo (already one model) and local (never talks).
        closers: called by :meth:`close` in order (default: ``node.close``).
    """

    def __init__(
        self,
        *,
        step: OuterStep,
        flat: FlatView,
        H: int,
        steps: int,
        node: Any = None,
        payloads: RangePayloads | None = None,
        site: str = "",
        all_live: bool = False,
        tau: int = 0,
        mix: float = 0.5,
        group: dist.ProcessGroup | None = None,
        rank: int = 0,
        world: int = 1,
        metrics: Any = None,
        pull_timeout_s: float | None = None,
        join_timeout_s: float = 60.0,
        linger_s: float = 10.0,
        say: Callable[[str], None] | None = None,
        final_average: bool = False,
        closers: list[Callable[[], None]] | None = None,
    ) -> None:
        if H < 1:
            raise ValueError(f"outer.H={H} must be >= 1")
        if not 0 <= tau < H:
            raise ValueError(f"outer.tau={tau} must be in [0, outer.H) = [0, {H})")
        if (node is None) != (payloads is None):
            raise ValueError("give both node and payloads (noloco, diloco) or neither (local)")
        self.method, self.flat, self.H, self.steps = step, flat, H, steps
        self.node, self.payloads, self.site, self.all_live = node, payloads, site, all_live
        self.tau, self.mix = tau, mix
        self.group, self.rank, self.world = group, rank, world
        self.metrics, self.pull_timeout_s = metrics, pull_timeout_s
        self.join_timeout_s, self.linger_s = join_timeout_s, linger_s
        self.say = say or (lambda msg: None)
        self.final_average = final_average and node is not None and not all_live
        self.final: dict[str, Any] | None = None  # the final average's record, once done
        self.closers = list(closers) if closers is not None else ([node.close] if node else [])
        # the outer state lives in host memory (fp32), whatever the engine's device
        self.state = OuterState.start(flat.master().detach().cpu())
        self.pending: _Round | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="outer-pull")
        self.last: _Round | None = None
        self.history: list[dict[str, Any]] = []
        self._mark = time.perf_counter()  # end of the previous round (utilization window)
        self._stall = 0.0  # seconds training was blocked by rounds in the window
        self.totals = {"bytes_sent": 0.0, "bytes_recv": 0.0, "rounds": 0, "dropped": 0}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> OuterLoop:
        """Wait (rank 0, up to ``join_timeout_s``) until every configured peer is live."""
        if self.payloads is not None:  # load the codec kernels now, not inside round 1
            self.payloads.warm_up()
        if self.node is not None and self.rank == 0 and self.node.membership is not None:
            want = len(self.node.peers) + 1
            t0 = time.monotonic()
            while len(self.node.live_sites()) < want:
                if time.monotonic() - t0 > self.join_timeout_s:
                    self.say(
                        f"outer: {len(self.node.live_sites())}/{want} sites live after "
                        f"{self.join_timeout_s:.0f} s; starting anyway"
                    )
                    break
                time.sleep(0.1)
                self.node.membership.beat()  # do not wait for the next heartbeat
            else:
                self.say(f"outer: all {want} sites live")
        if self.world > 1:
            dist.barrier(group=self.group)
        self._mark = time.perf_counter()
        return self

    def finish(self) -> None:
        """Merge a round still in flight; give the partners time to pull the last round (and the
        final average); count what they pulled since the last record. Collective."""
        if self.pending is not None:
            self._merge(self.pending)
        if self.node is None:
            return
        want, since = 0, None
        if self.last is not None and self.last.partners:
            want = (1 if self.all_live else 2) * len(self.last.partners)  # streams x partners
            since = self.last.served_before
        if self.final is not None:
            want += self.final["peers"]
            since = self.final["served_before"] if since is None else since
        # ``want`` counts partners, not their ranks' pulls (a partner with more ranks, or with
        # ranges across two of ours, pulls more than once): once it is reached, stay until no
        # pull has arrived for SETTLE_S (its ranks pull together), within linger_s in all
        t0 = last_change = time.monotonic()
        last = None
        while want and time.monotonic() - t0 < self.linger_s:
            served = self.node.metrics.snapshot().get("served_pulls", 0.0)
            now = time.monotonic()
            if served != last:
                last, last_change = served, now
            if served - since >= want and now - last_change >= SETTLE_S:
                break
            time.sleep(0.05)
        # what the partners pulled after the last record (collective: every rank calls finish)
        g = self.node.round_metrics()
        sent, recv = self._site_sum([g.get("bytes_sent", 0.0), g.get("bytes_recv", 0.0)])
        self.totals["bytes_sent"] += sent
        self.totals["bytes_recv"] += recv
        if self.final is not None:
            self.final["bytes_sent"] += sent

    def settled(self) -> bool:
        """No round in flight: the state is that of a round boundary (safe to checkpoint)."""
        return self.pending is None

    def close(self) -> None:
        """Stop the gossip node (and the WAN proxy, if any). Idempotent."""
        closers, self.closers = self.closers, []
        self._pool.shutdown(wait=False, cancel_futures=True)
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 (closing must go on)
                log.exception("outer: close failed")

    # ------------------------------------------------------------------ rounds

    def on_step_end(self, done: int) -> None:
        """The trainer's hook: run, start or merge a round after inner step ``done``."""
        p = self.pending
        if p is not None and (done >= p.step + self.tau or done >= self.steps):
            self._merge(p)
        if done % self.H == 0:
            self._boundary(done // self.H, done, overlap=self.tau > 0 and done < self.steps)
        if done == self.steps and self.final_average:
            self._final(done)

    def _live(self) -> list[str]:
        live = self.node.live_sites() if self.rank == 0 else None
        if self.world > 1:
            obj = [live]
            dist.broadcast_object_list(obj, src=dist.get_global_rank(self.group, 0)
                                       if self.group is not None else 0, group=self.group)  # fmt: skip
            live = obj[0]
        return list(live)

    def _partners(self, t: int) -> list[str]:
        if self.node is None:
            return []
        live = self._live()
        if self.all_live:
            return [s for s in live if s != self.site]
        return self.node.partners(t, live)

    @torch.no_grad()
    def _boundary(self, t: int, done: int, overlap: bool) -> None:
        t0 = time.perf_counter()
        theta = self.flat.master()
        delta = theta.detach().float().cpu() - self.state.phi
        partners = self._partners(t)
        if self.payloads is None:
            out = Outgoing(t, delta, self.state.phi.clone(), (), 0)
            served = 0.0
        else:
            out, bufs = self.payloads.encode(t, delta, self.state.phi, self.state.momentum)
            served = self.node.metrics.snapshot().get("served_pulls", 0.0)
            for stream, (buf, label) in bufs.items():
                if stream == "delta" or not self.all_live:  # DiLoCo never pulls phi
                    self._publish(t, stream, buf, label)
        r = _Round(t, done, out, partners, t0, served_before=served)
        if overlap and partners:
            r.thread = threading.Thread(target=self._pull_all, args=(r,), daemon=True,
                                        name=f"outer-pull-{t}")  # fmt: skip
            r.thread.start()
            r.stall = time.perf_counter() - t0
            self.pending = r
            return
        self._pull_all(r)
        self._merge(r, blocking_since=t0)

    def _publish(self, t: int, stream: str, buf: Any, label: str) -> None:
        """Publish this rank's encoded ``stream`` of round ``t`` (codec ``label``)."""
        self.node.publish(t, stream, buf, codec=label)

    def _pull_all(self, r: _Round) -> None:
        """Pull every partner's delta (and phi) concurrently; fill ``r.pulled``."""
        streams = ("delta",) if self.all_live else ("delta", "phi")
        jobs = {
            (p, s): self._pool.submit(self.payloads.pull, self.node, p, r.t, s, self.pull_timeout_s)
            for p in r.partners
            for s in streams
        }  # fmt: skip
        for p in r.partners:
            d, cause = jobs[(p, "delta")].result()
            if self.all_live:  # DiLoCo ignores phi (all sites hold the same): not pulled
                ph = r.out.phi if d is not None else None
            else:
                ph, cause_phi = jobs[(p, "phi")].result()
                cause = cause or cause_phi
            if d is not None and ph is not None:
                bad = implausible(d, ph, r.out.delta, r.out.phi)
                if bad:
                    d = ph = None
                    cause = "implausible"
                    log.warning("round %d: partner %s sent an implausible payload: %s", r.t, p, bad)
                    if self.node is not None:
                        self.node.metrics.add("fail_implausible")
                        self.node.strike(p, r.t, f"implausible payload: {bad}")
            if d is None or ph is None:
                log.warning("round %d: partner %s dropped (%s); n = 1 for it", r.t, p, cause)
            r.pulled[p] = (d, ph, cause)

    @torch.no_grad()
    def _merge(self, r: _Round, blocking_since: float | None = None) -> None:
        t0 = blocking_since if blocking_since is not None else time.perf_counter()
        if r.thread is not None:
            r.thread.join()
        self.pending = None
        ok = {p: v for p, v in r.pulled.items() if v[0] is not None and v[1] is not None}
        members = sorted([(self.site, r.out.delta, r.out.phi)] + [(p, d, ph) for p, (d, ph, _) in ok.items()],
                         key=lambda m: m[0])  # fmt: skip
        if len(members) == 1:
            deltas, phis = [r.out.delta], [r.out.phi]
        else:
            deltas, phis = [m[1] for m in members], [m[2] for m in members]
        # consensus distance from the pulled phi (before the update)
        sq = sum(float((ph - self.state.phi).double().pow(2).sum()) for _, (_, ph, _) in ok.items())
        cnt = float(len(ok) * self.state.phi.numel()) if not self.all_live else 0.0
        theta = self.flat.master()
        theta_local = theta.clone() if r.thread is not None else None
        try:
            self.method.apply(theta, self.state, deltas, phis)
        except ValueError as e:  # cannot happen with checked payloads; never apply a bad value
            log.warning("round %d: %s; local step instead", r.t, e)
            ok, sq, cnt = {}, 0.0, 0.0
            deltas, phis = [r.out.delta], [r.out.phi]
            self.method.apply(theta, self.state, deltas, phis)
        self.last_means = self._means(deltas, phis)
        if theta_local is not None:
            theta.mul_(1 - self.mix).add_(theta_local, alpha=self.mix)
        self.flat.sync()
        end = time.perf_counter()
        r.stall += end - t0
        self.last = r
        self._record(r, ok, sq, cnt, end)

    def _site_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the site's ranks (float64; collective when world > 1)."""
        vec = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(vec, group=self.group)
        return vec.tolist()

    @staticmethod
    def _means(deltas: list[torch.Tensor], phis: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return torch.stack(deltas).mean(0), torch.stack(phis).mean(0)

    def _record(self, r: _Round, ok: dict, sq: float, cnt: float, end: float) -> None:
        g = self.node.round_metrics() if self.node is not None else {}
        n = 1 + len(ok)
        sent, recv, sq_all, cnt_all, n_sum, dropped = self._site_sum(
            [g.get("bytes_sent", 0.0), g.get("bytes_recv", 0.0), sq, cnt, n, float(n < 1 + len(r.partners))]
        )  # fmt: skip
        wall = end - self._mark
        util = max(0.0, wall - self._stall - r.stall) / wall if wall > 0 else 1.0
        self._mark, self._stall = end, 0.0
        self.totals["bytes_sent"] += sent
        self.totals["bytes_recv"] += recv
        self.totals["rounds"] += 1
        self.totals["dropped"] += int(dropped > 0)
        rec = dict(
            partner=",".join(r.partners),
            n=n,
            n_mean=n_sum / self.world,
            dropped=",".join(f"{p}:{c}" for p, (d, ph, c) in r.pulled.items() if p not in ok),
            bytes_sent=sent,
            bytes_recv=recv,
            round_seconds=end - r.started,
            stall_seconds=r.stall,
            consensus_distance=(sq_all / cnt_all) ** 0.5 if cnt_all else None,
            compute_utilization=util,
            mean_crc=_crc(self.last_means[:1] if self.all_live else self.last_means),
        )
        for k, v in g.items():
            if k.startswith("fail_") or k in ("retries", "strikes", "bans"):
                rec[k] = v
        self.history.append({"step": r.step, "round": r.t, **rec})
        if self.metrics is not None:
            self.metrics.log("outer", step=r.step, round=r.t, **rec)

    @torch.no_grad()
    def _final(self, done: int) -> None:
        """The final average over every live site (module docstring)."""
        t0 = time.perf_counter()
        t = done // self.H + 1  # never a regular round: no boundary follows the last step
        theta = self.flat.master()
        own = theta.detach().float().cpu().clone()
        served = self.node.metrics.snapshot().get("served_pulls", 0.0)
        self.node.publish(t, FINAL_STREAM, self.payloads.raw(own), codec="raw")
        peers = [s for s in self._live() if s != self.site]
        jobs = {p: self._pool.submit(self.payloads.pull, self.node, p, t, FINAL_STREAM,
                                     self.pull_timeout_s, "none") for p in peers}  # fmt: skip
        got = {p: jobs[p].result() for p in peers}
        for p, (v, _) in got.items():
            if v is not None and (bad := implausible_phi(v, own)):
                log.warning("final average: %s sent implausible weights: %s", p, bad)
                self.node.strike(p, t, f"implausible final weights: {bad}")
                got[p] = (None, "implausible")
        ok = torch.tensor([float(got[p][0] is not None) for p in peers], dtype=torch.float64)
        if self.world > 1 and peers:  # the same members on every rank of the site
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        kept = {p for p, k in zip(peers, ok.tolist(), strict=True) if k > 0}
        members = sorted([(self.site, own)] + [(p, got[p][0]) for p in kept], key=lambda m: m[0])
        vals = [m[1] for m in members]
        sq = sum(float((v - own).double().pow(2).sum()) for v in vals)
        mean = torch.stack(vals).mean(0)
        theta.copy_(mean.to(theta.device, theta.dtype))
        self.state.phi.copy_(mean)
        self.flat.sync()
        g = self.node.round_metrics()
        sent, recv, sq_all, cnt_all = self._site_sum([g.get("bytes_sent", 0.0),
            g.get("bytes_recv", 0.0), sq, float(len(kept) * own.numel())])  # fmt: skip
        self.totals["bytes_sent"] += sent
        self.totals["bytes_recv"] += recv
        left_out = [f"{p}:{got[p][1] or 'rank'}" for p in peers if p not in kept]
        rec = dict(final=True, partner=",".join(m[0] for m in members if m[0] != self.site),
                   n=len(vals), dropped=",".join(left_out), bytes_sent=sent, bytes_recv=recv,
                   round_seconds=time.perf_counter() - t0,
                   consensus_distance=(sq_all / cnt_all) ** 0.5 if cnt_all else None,
                   mean_crc=_crc((mean,)))  # fmt: skip
        self.final = {"peers": len(peers), "served_before": served, **rec}
        if left_out:
            self.say(f"final average: {', '.join(left_out)} left out; averaged {len(vals)} sites")
        if self.metrics is not None:
            self.metrics.log("outer", step=done, round=t, **rec)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "phi": self.state.phi.clone(),
            "momentum": self.state.momentum.clone(),
            "rounds": self.state.rounds,
            "payloads": self.payloads.state_dict() if self.payloads is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.phi.copy_(state["phi"])
        self.state.momentum.copy_(state["momentum"])
        self.state.rounds = int(state["rounds"])
        if self.payloads is not None and state.get("payloads") is not None:
            self.payloads.load_state_dict(state["payloads"])


# A partner's finite payload is still refused when it is far outside what training produces:
# its delta more than MAX_DELTA_RATIO times this site's own (same optimizer, same steps), or its
# phi farther from this site's phi than MAX_PHI_GAP times the RMS of this site's phi (sites that
# share an init stay within a few percent of each other; even two independent random inits are
# only sqrt(2) apart). Garbage of any finite size (1e30, random words) is never applied.
MAX_DELTA_RATIO = 100.0
MAX_PHI_GAP = 10.0


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0


def implausible(
    delta: torch.Tensor, phi: torch.Tensor, own_delta: torch.Tensor, own_phi: torch.Tensor
) -> str:
    """Why a partner's decoded (finite) ``delta`` / ``phi`` must not be applied, or ``""``."""
    rd, own_rd = _rms(delta), _rms(own_delta)
    if rd > MAX_DELTA_RATIO * own_rd + 1e-12:
        return f"delta RMS {rd:.3g} is over {MAX_DELTA_RATIO:g}x this site's {own_rd:.3g}"
    return implausible_phi(phi, own_phi)


def implausible_phi(phi: torch.Tensor, own_phi: torch.Tensor) -> str:
    """Why a partner's decoded (finite) weights ``phi`` must not be applied, or ``""``."""
    gap, own_rp = _rms(phi - own_phi), _rms(own_phi)
    if gap > MAX_PHI_GAP * own_rp + 1e-12:
        return (
            f"phi is {gap:.3g} (RMS) from this site's, over {MAX_PHI_GAP:g}x its RMS {own_rp:.3g}"
        )
    return ""


def _crc(ts: tuple[torch.Tensor, ...]) -> int:
    """CRC-32 of the bytes of the group means: equal on every member of a group."""
    import zlib

    crc = 0
    for t in ts:
        crc = zlib.crc32(t.contiguous().numpy().tobytes(), crc)
    return crc
