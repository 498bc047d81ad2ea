"""The outer round driver of one rank: every ``H`` inner steps, one NoLoCo / DiLoCo / local round.

Per round ``t`` (boundary at inner step ``t * H``; with ``H_first`` the first rounds have
lengths of their own, ``loco.outer.schedule``), on every rank of a site, on its own range::

    delta = theta - phi                                  this site's inner progress
    live  = rank 0's live sites, broadcast to the site   so every rank pairs the same way
    group = pairing(seed, m, live)   (noloco: proposed; settled with the pulls, agree_rpc;
                                      m: the meeting's number; nobody between meetings)
            | all live sites (diloco) | nobody (local)
    publish encode(delta + e), phi   -> this rank's mailbox
    pull the partners' delta and phi on [lo, hi)         failures: that partner is dropped
    apply (methods.py) with the DECODED values of every member, own included, in site order
    theta <- phi (with overlap: + the overlap's own progress, or a mix; outer.merge); sync_params()

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

Streaming fragments (``fragments = F > 1``, ``loco.outer.fragments``): the flat space is cut into
``F`` fragments, synced one at a time every ``H / F`` inner steps (each every ``H`` steps), each
sync overlapped for ``tau`` steps; a sync is a round of the fragment's piece, with the gossip
round id ``j`` of the schedule (pairing, publish, pull) and ``t`` its round in the records.

The parts: ``schedule`` (when: H, tau, the last step, the final average's trigger), ``round``
(one round: encode, publish, pull, plausibility, merge), ``plausible`` (the bound on a
partner's values), ``stats`` (the ``outer`` records and totals), ``final`` (the final average).
:class:`OuterLoop` coordinates them; the gossip node alone reads and writes its counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from loco.gossip.membership import wait_for_sites
from loco.outer.closing import closing_parts
from loco.outer.exchange import RangePayloads
from loco.outer.final import FINAL_RAW_STREAM, FINAL_SKETCH_STREAM, FINAL_STREAM, FinalAverage
from loco.outer.flat_view import FlatView
from loco.outer.fragments import Fragments
from loco.outer.landing import drawn_leader, leader_of
from loco.outer.methods import OuterState, OuterStep
from loco.outer.plausible import MAX_DELTA_RATIO, MAX_PHI_GAP, implausible, implausible_phi
from loco.outer.round import Round, Rounds
from loco.outer.schedule import SETTLE_S, Meetings, Schedule, expected_pulls
from loco.outer.sliced import REDUCES, SlicedReduce
from loco.outer.stats import OuterStats
from loco.site_comm import SiteComm

__all__ = [
    "FINAL_STREAM",
    "MAX_DELTA_RATIO",
    "MAX_PHI_GAP",
    "SETTLE_S",
    "OuterLoop",
    "implausible",
    "implausible_phi",
]

log = logging.getLogger(__name__)


class OuterLoop:
    """Drives the outer rounds of one rank; call :meth:`on_step_end` after every inner step.

    The coordinator of :class:`~loco.outer.schedule.Schedule` (when),
    :class:`~loco.outer.round.Rounds` (one round), :class:`~loco.outer.stats.OuterStats`
    (records) and :class:`~loco.outer.final.FinalAverage`. Subclasses may override
    :meth:`on_step_end`, :meth:`_boundary` (the start of round ``t``) and :meth:`_publish`
    (every stream the rounds publish goes through it).

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
        tau: overlap: merge ``tau`` inner steps after the boundary; ``tau = 0`` blocks.
        merge, mix: how an overlapped round or fragment's sync lands
            (:class:`~loco.outer.round.Rounds`): ``carry``, ``theta <- phi + theta_local -
            theta_boundary``, or ``mix``, ``theta <- mix * theta_local + (1 - mix) * phi``.
        comm: the site's ranks (``SiteComm``: live-set broadcast, metric sums); None: one rank.
        metrics: rank 0's ``MetricsWriter``.
        pull_timeout_s: deadline of one pull (None: the node's default).
        join_timeout_s: at start, rank 0 waits up to this long for every peer to be live.
        linger_s: at the end, wait up to this long for the partners to pull the last round.
        final_average: after the last step, average the weights over every live site (see the
            module docstring); ignored for DiLoCo (already one model) and local (never talks).
        final_lattice: the final average's weights travel as an 8-bit lattice frame
            (``loco.outer.final``); False: raw fp32.
        closers: called by :meth:`close` in order (default: ``node.close``).
        fragments: ``F``, streaming fragments (1: whole rounds; then ``tau`` overlaps a round).
        fragment_tau: with ``F > 1``, the overlap of one fragment's sync (< ``H / F``; None:
            ``H / F - 1``, the most the schedule allows).
        payloads_for: with ``F > 1`` and ``payloads``, ``payloads_for((a, b))`` builds the
            :class:`RangePayloads` of the piece ``[a, b)`` (same options).
        closing_for: DiLoCo: ``closing_for(span)`` builds the :class:`RangePayloads` of the
            closing syncs at the last step (their own codec; ``span`` None: the rank's range,
            else a fragment's piece), which carry the rounds' residual in (None: the rounds').
        diloco_reduce: DiLoCo's mean (``loco.outer.sliced``): ``sliced`` (reduce-scatter then
            all-gather; with fragments, of each fragment) or ``full``.
        H_first: the lengths of the first rounds, then every round is ``H`` long
            (``loco.outer.schedule``; empty: all are).
        meet_every, meet_first: NoLoCo, whole rounds: the sites pair up in each of the first
            ``meet_first`` rounds, then every ``meet_every``-th round, the last round one of
            them (:class:`~loco.outer.schedule.Meetings`); in the rounds between, each takes
            its outer step alone (n = 1: nothing is encoded, published or pulled).
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
        merge: str = "carry",
        comm: SiteComm | None = None,
        metrics: Any = None,
        pull_timeout_s: float | None = None,
        join_timeout_s: float = 60.0,
        linger_s: float = 10.0,
        say: Callable[[str], None] | None = None,
        final_average: bool = False,
        final_lattice: bool = False,
        closers: list[Callable[[], None]] | None = None,
        fragments: int = 1,
        fragment_tau: int | None = None,
        payloads_for: Callable[[tuple[int, int]], RangePayloads] | None = None,
        closing_for: Callable[..., RangePayloads] | None = None,
        diloco_reduce: str = "sliced",
        H_first: tuple[int, ...] | list[int] = (),
        meet_every: int = 1,
        meet_first: int = 0,
    ) -> None:
        if meet_every > 1 and (all_live or fragments > 1):
            raise ValueError(f"meet_every={meet_every}: above 1 only for NoLoCo's whole rounds")
        final_average = final_average and node is not None and not all_live
        self.schedule = Schedule.make(H=H, steps=steps, tau=tau, final_average=final_average,
                                      fragments=fragments, fragment_tau=fragment_tau,
                                      first=tuple(H_first))  # fmt: skip
        self.meetings = Meetings(every=meet_every, first=meet_first,
                                 last=self.schedule.rounds_done(steps))  # fmt: skip
        if (node is None) != (payloads is None):
            raise ValueError("give both node and payloads (noloco, diloco) or neither (local)")
        self.method, self.flat, self.H, self.steps = step, flat, H, steps
        self.node, self.payloads, self.site, self.all_live = node, payloads, site, all_live
        if getattr(payloads, "landing", None) is not None:  # its last meeting may be finer
            payloads.landing.last_rounds = self.meetings.final(payloads.landing.last_meetings)
        self.tau, self.mix = tau, mix
        self.comm = comm if comm is not None else SiteComm.single()
        self.metrics, self.pull_timeout_s = metrics, pull_timeout_s
        self.join_timeout_s, self.linger_s = join_timeout_s, linger_s
        self.say = say or (lambda msg: None)
        self.final_average = final_average
        self.final: dict[str, Any] | None = None  # the final average's record, once done
        self.closers = list(closers) if closers is not None else ([node.close] if node else [])
        # the outer state lives in host memory (fp32), whatever the engine's device
        self.state = OuterState.start(flat.master().detach().cpu())
        self.pending: Round | None = None
        self.last: Round | None = None  # the last merged round (with fragments: its last sync)
        self.last_sync: Round | None = None  # the last merged sync (a round without fragments)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="outer-pull")
        self.stats = OuterStats(node=node, comm=self.comm, metrics=metrics,
                                all_live=all_live)  # fmt: skip
        kw = dict(method=step, flat=flat, state=self.state, node=node, payloads=payloads,
                  site=site, all_live=all_live, mix=mix, merge=merge, pool=self._pool,
                  pull_timeout_s=pull_timeout_s, publish=self._publish)  # fmt: skip
        if diloco_reduce not in REDUCES:
            raise ValueError(f"diloco_reduce={diloco_reduce!r}: choose {' or '.join(REDUCES)}")
        use_sliced = all_live and payloads is not None and diloco_reduce == "sliced"
        sliced = None
        if use_sliced and fragments == 1:
            sliced = SlicedReduce(node=node, payloads=payloads, site=site, P=flat.numel,
                                  pool=self._pool, pull_timeout_s=pull_timeout_s)  # fmt: skip
        # the leader by the meeting's number; hypercube pairs meet every k-th meeting, where a
        # rotation by that number would give one member of a pair the lead every time
        pick = drawn_leader if getattr(node, "pairing", "random") == "hypercube" else leader_of

        def leader(members: list[str], rid: int) -> str:
            return pick(members, self.meetings.index(rid))

        self.rounds = Rounds(**kw, sliced=sliced, leader=leader)
        self.fragments = (
            Fragments(F=fragments, payloads_for=payloads_for, sliced=use_sliced, **kw)
            if fragments > 1
            else None
        )
        self.closing, self._closing_payloads = None, None  # DiLoCo's, in their own codec
        if all_live and payloads is not None and closing_for is not None:
            self.closing, self._closing_payloads = closing_parts(
                closing_for, payloads, kw, fragments=fragments, sliced=use_sliced, leader=leader
            )
        if node is not None and not all_live:  # serve each round only to the agreed group
            node.require_agreement(exempt=(FINAL_STREAM, FINAL_RAW_STREAM, FINAL_SKETCH_STREAM))
        self._averager = None
        if final_average:
            self._averager = FinalAverage(flat=flat, state=self.state, node=node,
                                          payloads=payloads, site=site, live=self._live,
                                          pool=self._pool, pull_timeout_s=pull_timeout_s,
                                          stats=self.stats, say=self.say,
                                          lattice=final_lattice)  # fmt: skip

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per merged round (``step``, ``round`` and the ``outer`` line's fields)."""
        return self.stats.history

    @property
    def totals(self) -> dict[str, Any]:
        """The run's bytes sent and received (site sums), rounds, and rounds with a drop."""
        return self.stats.totals

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, late: bool = False) -> OuterLoop:
        """Wait (rank 0, up to ``join_timeout_s``) until every configured peer is live.
        ``late``: this site resumed or joined past step 0; it waits only until a live peer is
        under way (a member killed for good must not hold a restart back)."""
        if self.payloads is not None:  # load the codec kernels now, not inside round 1
            self.payloads.warm_up()
        if self._closing_payloads is not None:
            self._closing_payloads.warm_up()
        if self.node is not None and self.comm.rank == 0 and self.node.membership is not None:
            wait_for_sites(self.node, self.site, late=late, timeout_s=self.join_timeout_s,
                           say=self.say)  # fmt: skip
        self.comm.barrier()
        self.stats.restart()
        return self

    def finish(self) -> None:
        """Merge a round still in flight; give the partners time to pull the last round (and the
        final average); count what they pulled since the last record. Collective."""
        if self.pending is not None:
            self._merge(self.pending)
        if self.node is None:
            return
        last = self.last_sync
        last_partners = last.agreed if last is not None else None
        want = expected_pulls(last_partners, self.all_live,
                              self.final["owed"] if self.final is not None else None,
                              self.method.sends_delta)  # fmt: skip
        reduce = last.owner.sliced if last is not None else self.rounds.sliced
        if reduce is not None and last_partners:  # slice pieces and averages
            want = reduce.expected_pulls(last_partners)
        since = 0.0
        if last_partners:
            since = last.served_before
        elif self.final is not None:
            since = self.final["served_before"]
        # once ``want`` pulls arrived, stay until none has arrived for SETTLE_S (a partner's
        # ranks pull together), within linger_s in all
        self.node.wait_quiet(want, since=since, quiet_s=SETTLE_S, timeout_s=self.linger_s)
        # what the partners pulled after the last record (collective: every rank calls finish)
        sent, _ = self.stats.gossip_sums()
        if self.final is not None:
            self.final["bytes_sent"] += sent

    def settled(self) -> bool:
        """No round (no fragment's sync) in flight: every value's state is that of a boundary
        (safe to checkpoint). With ``tau < H / F`` this holds ``H / F - tau`` steps per sync."""
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
        """The trainer's hook: run, start or merge a round (a sync) after inner step ``done``."""
        p = self.pending
        if p is not None and self.schedule.merge_due(p.step, done):
            self._merge(p)
        if (j := self.schedule.round_at(done)) is not None:
            self._boundary(j, done, overlap=self.schedule.overlaps(done))
        if done == self.steps:
            self._close_tails(done)
        if self.schedule.final_due(done):
            self._final(done)

    def _live(self) -> list[str]:
        """Rank 0's live sites, broadcast to the site's ranks. Collective when world > 1."""
        live = self.node.live_sites() if self.comm.rank == 0 else None
        return list(self.comm.broadcast_object(live))

    def _partners(self, t: int) -> tuple[list[str], Any]:
        """The partners of round ``t`` and, for NoLoCo, this site's proposal of it. DiLoCo:
        every live site. NoLoCo: the other members of the group this site proposes from rank
        0's live view (``loco.gossip.agree_rpc``); every rank proposes it and later settles it
        on its own, where the round's pulls run (:meth:`Rounds.agree`), so the boundary never
        waits for a partner. Between meetings (``meet_every``) none, with no collective.
        Collective when world > 1 (the live view's broadcast)."""
        if self.node is None or not self.meetings.meets(t):
            return [], None
        live = self._live()
        if self.all_live:
            return [s for s in live if s != self.site], None
        mine = self.node.propose(t, live, key=self.meetings.index(t))
        return [s for s in mine.group if s != self.site], mine

    def _closes(self, j: int) -> bool:
        """Sync ``j`` is past the run's last regular one: a tail's closing sync at the last step."""
        return j > self.schedule.syncs_done(self.steps)

    def _rounds_of(self, j: int) -> tuple[Rounds, int, int | None]:
        """The rounds of sync ``j`` (a closing sync's in the closing codec, where one is set),
        its round and its fragment (None without fragments)."""
        closing = self.closing if self._closes(j) else None
        if self.fragments is None:
            return closing or self.rounds, j, None
        t, f = self.schedule.round_of(j), self.schedule.fragment_of(j)
        return (closing or self.fragments).rounds_for(j, t, f), t, f

    @torch.no_grad()
    def _boundary(self, t: int, done: int, overlap: bool) -> None:
        """Start round ``t`` (with fragments: sync ``t``) at inner step ``done``: propose and
        publish, then settle the agreement, pull and merge now, or (with ``overlap`` and
        proposed partners) settle and pull in the background and merge ``tau`` steps later."""
        t0 = time.perf_counter()
        rounds, rnd, f = self._rounds_of(t)
        delta = rounds.delta()
        partners, proposal = self._partners(t)
        r = rounds.open(rnd, done, delta, partners, t0, wire=None if f is None else t,
                        fragment=f, proposal=proposal)  # fmt: skip
        r.owner, r.closing = rounds, self._closes(t)
        if overlap and r.partners:  # the agreement and the pulls in the background
            rounds.start_pulls(r)
            r.stall = time.perf_counter() - t0
            self.pending = r
            return
        rounds.pull_all(r)
        self._merge(r, blocking_since=t0)

    def _publish(self, t: int, stream: str, buf: Any, label: str) -> None:
        """Publish this rank's encoded ``stream`` of round ``t`` (codec ``label``; with
        fragments, of sync ``t``: the rank's piece of its fragment)."""
        if self.fragments is not None:
            self.fragments.publish(self.node, t, stream, buf, label)
        else:
            self.node.publish(t, stream, buf, codec=label)

    def _merge(self, r: Round, blocking_since: float | None = None) -> None:
        t0 = blocking_since if blocking_since is not None else time.perf_counter()
        r.join()
        self.pending = None
        merged = r.owner.merge(r)
        if r.fragment is not None and not r.closing:
            # whole rounds done: what checkpoints and joins call the state's rounds
            self.state.rounds = r.t - (r.fragment < self.fragments.F - 1)
        self.last_means = merged.means
        end = time.perf_counter()
        r.stall += end - t0
        self.last_sync = r
        if r.fragment is None or r.fragment == self.fragments.F - 1:
            self.last = r
        self.stats.round(r, merged.ok, merged.sq, merged.cnt, end, merged.means)

    def _final(self, done: int) -> None:
        """The final average over every live site (module docstring)."""
        self.final = self._averager.run(done, self.schedule.final_round(done))

    def _close_tails(self, done: int) -> None:
        """DiLoCo, at the last step: each fragment (without fragments: the whole space) whose
        last sync was before ``done`` syncs its progress since, blocking, as its next sync id,
        and lands on the group's mean of it with no outer step (``Rounds``' closing merge), so
        the sites end on one model whatever ``steps`` is. (NoLoCo keeps its tails as trained:
        its final average makes one model, and a closing step of each tail alone before it did
        not pay, docs/outer.md.) Collective (every rank syncs every fragment, piece or not)."""
        if self.node is None or not self.all_live:
            return
        last, F = self.schedule.syncs_done(done), self.schedule.fragments
        nxt = sorted(last + 1 + (f - last) % F for f in self.schedule.tails(done))
        for j in nxt:  # the fragment's next sync id: unique, after every sync of the run
            self._boundary(j, done, overlap=False)
