"""One outer round of one rank: encode and publish, pull every partner, check, merge.

:class:`Rounds` does the work of a round on the rank's own range; the ``OuterLoop`` decides
when (``loco.outer.schedule``) and records it (``loco.outer.stats``)::

    r = rounds.open(t, done, delta, partners, t0, proposal=mine)  # encode, publish
    rounds.pull_all(r)        # (a thread, with overlap) settle mine (NoLoCo), fill r.pulled
    merged = rounds.merge(r)                        # apply with the DECODED values, site order

A partner whose pull failed, or whose payload is implausible (``loco.outer.plausible``; one
strike and ``fail_implausible``), is dropped for the round: with nobody left it is the local
step (n = 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from loco.outer.exchange import SKETCH_STREAM, Outgoing, RangePayloads
from loco.outer.flat_view import FlatView
from loco.outer.landing import OFFSET_STREAM, Landing, leader_of
from loco.outer.methods import OuterState, OuterStep
from loco.outer.plausible import implausible, implausible_phi
from loco.outer.sliced import SlicedReduce

log = logging.getLogger("loco.outer.loop")

Pulled = tuple[torch.Tensor | None, torch.Tensor | None, str]  # delta, phi, cause of a failure
MERGES = ("mix", "carry")  # how an overlapped round lands (Rounds' merge)
NO_DELTA = torch.zeros(0)  # a partner's delta where the method sends none (sends_delta false)


@dataclass
class Round:
    """One round in flight or merged: its number, boundary step, own decoded values, partners,
    start (``perf_counter``), training stall so far, what each partner gave, the background
    pull thread (overlap) and the node's served-pulls mark at the boundary. A streaming
    fragment's sync (``loco.outer.fragments``) also has its fragment and its gossip round id
    ``wire`` (publish, pull, strikes); a whole round's id is ``t``."""

    t: int
    step: int  # inner step of the boundary
    out: Outgoing
    partners: list[str]
    started: float
    stall: float = 0.0
    pulled: dict[str, Pulled] = field(default_factory=dict)
    thread: threading.Thread | None = None
    served_before: float = 0.0
    wire: int | None = None
    fragment: int | None = None
    mean: torch.Tensor | None = None  # DiLoCo's sliced reduce: the assembled mean delta
    refused: dict[str, str] = field(default_factory=dict)  # partner not agreed -> why
    proposal: Any = None  # NoLoCo: this site's proposal, settled by pull_all (agree_rpc)
    landing: bool = False  # the group meets by sequential landing (loco.outer.landing)
    land: torch.Tensor | None = None  # where this rank lands (None: no pull this round)
    land_miss: torch.Tensor | None = None  # this site's part of the landing's miss
    guessed: tuple[str, ...] = ()  # partners whose phi is a landing's estimate (no distance)
    eff: torch.Tensor | None = None  # landing: the phi this site coded (its phi less its miss)
    boundary: torch.Tensor | None = None  # merge "carry": theta at the boundary (until merged)
    window_momentum: torch.Tensor | None = None  # sizes the leader's frame by the momentum rule
    point: torch.Tensor | None = None  # what this site's phi stands for this round (exact)
    closing: bool = False  # a sync of a tail at the last step (DiLoCo, OuterLoop._close_tails)
    owner: Any = None  # the Rounds that opened it and merge it (OuterLoop)

    @property
    def agreed(self) -> list[str]:
        """The partners of the settled group (pulled); the others did not agree this round."""
        return [p for p in self.partners if p not in self.refused]

    def refuse(self, causes: dict[str, str]) -> None:
        """Drop the partners in ``causes`` (they did not agree to the group): never pulled."""
        for p, cause in causes.items():
            log.warning("round %d: partner %s did not agree (%s); n = 1 for it", self.rid, p, cause)
            self.refused[p] = cause
            self.pulled[p] = (None, None, cause)

    @property
    def rid(self) -> int:
        """The gossip round id of this round's payloads."""
        return self.t if self.wire is None else self.wire

    def join(self) -> None:
        """Wait for the background pulls, if any."""
        if self.thread is not None:
            self.thread.join()


@dataclass
class Merged:
    """What a merge used: the partners that answered, this rank's squared phi distance to them
    and its element count (consensus distance), and the group means (delta, phi; the delta's
    empty where the method sends none)."""

    ok: dict[str, Pulled]
    sq: float
    cnt: float
    means: tuple[torch.Tensor, ...]


class Rounds:
    """The work of a round on this rank's range.

    Args:
        method: the outer update; flat: the engine's flat view; state: the outer state.
        node, payloads: the rank's ``GossipNode`` and :class:`RangePayloads` (None: local).
        site: this site's name. all_live: DiLoCo (only the delta stream travels).
        mix: overlap's ``theta <- mix * theta_local + (1 - mix) * phi`` (merge ``mix``).
        merge: how an overlapped round lands on the weights that trained on meanwhile:
            ``mix`` (above; Streaming DiLoCo) or ``carry``, ``theta <- phi + (theta_local -
            theta_boundary)``: the new phi plus the overlap's own inner progress (a copy of
            the range's weights is kept from the boundary to the merge).
        pool: the pull threads. pull_timeout_s: deadline of one pull (None: the node's).
        publish: ``publish(t, stream, buf, label)``, the loop's (overridable) publisher.
        sliced: DiLoCo's sliced reduce (``loco.outer.sliced``; None: every partner's whole
            delta is pulled).
        leader: ``leader(members, rid)``, the landing's leader of round id ``rid`` (default
            :func:`loco.outer.landing.leader_of`).
    """

    def __init__(self, *, method: OuterStep, flat: FlatView, state: OuterState, node: Any,
                 payloads: RangePayloads | None, site: str, all_live: bool, mix: float,
                 pool: ThreadPoolExecutor, pull_timeout_s: float | None,
                 publish: Callable[[int, str, Any, str], None],
                 sliced: SlicedReduce | None = None,
                 leader: Callable[[list[str], int], str] = leader_of,
                 merge: str = "carry") -> None:  # fmt: skip
        if merge not in MERGES:
            raise ValueError(f"merge={merge!r}: choose {' or '.join(MERGES)}")
        self.merge_rule = merge
        self.method, self.flat, self.state = method, flat, state
        self.sliced, self.leader = sliced, leader
        self.node, self.payloads, self.site, self.all_live = node, payloads, site, all_live
        self.mix, self.pool, self.pull_timeout_s, self.publish = mix, pool, pull_timeout_s, publish

    def delta(self) -> torch.Tensor:
        """This site's inner progress on the rank's range: ``theta - phi`` (fp32, host)."""
        return self.flat.master().detach().float().cpu() - self.state.phi

    def open(self, t: int, done: int, delta: torch.Tensor, partners: list[str], started: float,
             wire: int | None = None, fragment: int | None = None,
             proposal: Any = None) -> Round:  # fmt: skip
        """Encode round ``t`` (boundary at step ``done``) and publish it as gossip round
        ``wire`` (default ``t``); no pull yet. ``proposal``: NoLoCo, this site's proposal of
        the round (its group: ``partners`` and this site), which :meth:`pull_all` settles
        before it pulls (None: ``partners`` are pulled as they are)."""
        rid = t if wire is None else wire
        eff = None
        point = self.method.consensus_point(self.state, delta)
        if self.payloads is None or (not partners and proposal is None and not self.all_live):
            # no talk (local), or a NoLoCo round between meetings: the exact local step
            out = Outgoing(t, delta, self.state.phi.clone(), (), 0)
            served = 0.0
        elif self.sliced is not None:
            served = self.node.served_mark()
            members = sorted({*partners, self.site})
            out = self.sliced.publish(rid, t, delta, self.state.phi, members)
        else:
            landing = self._landing()
            eff = landing.eff(point) if landing is not None else None
            phi = point if eff is None else eff  # with the landing: less its known miss
            wmom = self.method.window_momentum(self.state, delta)
            out, bufs = self.payloads.encode(t, delta, phi, wmom, group=tuple(sorted(partners)),
                                             send_delta=self.method.sends_delta)  # fmt: skip
            served = self.node.served_mark()
            for stream, (buf, label) in bufs.items():
                if stream == "delta" or not self.all_live:  # DiLoCo never pulls phi
                    self.publish(rid, stream, buf, label)
            return Round(t, done, out, partners, started, served_before=served, wire=wire,
                         fragment=fragment, proposal=proposal, eff=eff,
                         window_momentum=wmom, point=point)  # fmt: skip
        return Round(t, done, out, partners, started, served_before=served, wire=wire,
                     fragment=fragment, proposal=proposal, eff=eff, point=point)  # fmt: skip

    def start_pulls(self, r: Round) -> None:
        """Run :meth:`pull_all` of ``r`` on a background thread (overlap)."""
        if self.merge_rule == "carry":
            r.boundary = self.flat.master().detach().clone()
        r.thread = threading.Thread(target=self.pull_all, args=(r,), daemon=True,
                                    name=f"outer-pull-{r.rid}")  # fmt: skip
        r.thread.start()

    def pull_all(self, r: Round) -> None:
        """Settle ``r``'s proposal (:meth:`agree`), then pull every agreed partner's delta (and
        phi) concurrently; fill ``r.pulled`` (sliced: and ``r.mean``). No collective: it runs
        on a background thread when the round overlaps training."""
        if r.proposal is not None:
            self.agree(r)
        if self.sliced is not None:
            self._pull_sliced(r)
            return
        landing = self._landing()
        if landing is not None and r.agreed:
            self._pull_landing(r, landing)
            return
        streams = ("delta",) if self.all_live else ("delta", "phi")
        if not self.method.sends_delta:
            streams = ("phi",)
        jobs = {
            (p, s): self.pool.submit(self.payloads.pull, self.node, p, r.rid, s, self.pull_timeout_s)
            for p in r.agreed
            for s in streams
        }  # fmt: skip
        for p in r.agreed:
            d, cause = jobs[(p, "delta")].result() if "delta" in streams else (NO_DELTA, "")
            if self.all_live:  # DiLoCo ignores phi (all sites hold the same): not pulled
                ph = r.out.phi if d is not None else None
            else:
                ph, cause_phi = jobs[(p, "phi")].result()
                cause = cause or cause_phi
            if d is not None and ph is not None:
                d, ph, cause = self._check(r, p, d, ph, cause)
            if d is None or ph is None:
                log.warning("round %d: partner %s dropped (%s); n = 1 for it", r.rid, p, cause)
            r.pulled[p] = (d, ph, cause)

    def _landing(self) -> Landing | None:
        """The sequential landing of this rank (``outer.phi_landing``; NoLoCo only)."""
        if self.payloads is None or self.all_live or self.sliced is not None:
            return None
        return getattr(self.payloads, "landing", None)

    def _pull_landing(self, r: Round, landing: Landing) -> None:
        """The sequential landing of ``r``'s group (docs/outer.md): the leader's phi decoded
        by the followers, each follower's offset to the mean published and pulled by every
        other member, the landing point ``r.land``. Any failed pull: no landing this round
        (the deltas that arrived still average)."""
        r.landing = True
        members = sorted([self.site, *r.agreed])
        n, lead = len(members), self.leader(members, r.rid)
        followers = [m for m in members if m != lead]

        def pull(p: str, stream: str, codec: str | None = None, masks: list | None = None):
            return self.pool.submit(self.payloads.pull, self.node, p, r.rid, stream,
                                    self.pull_timeout_s, codec, masks)  # fmt: skip

        deltas = {p: pull(p, "delta") for p in r.agreed if self.method.sends_delta}
        eff = r.eff  # what open() coded
        assert eff is not None
        mine = None
        if self.site == lead:
            if self.payloads.sketched:  # size the window from the followers' sketches first
                self._lead_sketched(r, followers, pull)
            lead_phi, lead_cause = r.out.phi, ""
            r.land_miss = landing.leader_miss(r.out.phi, eff, n)
        else:
            masks: list[torch.Tensor] = []
            lead_phi, lead_cause = pull(lead, "phi", None, masks).result()
            # the leader's failed blocks (and a failed pull: all) get a zero offset: the leader
            # lands on its own decoded phi there, this site keeps its own, nobody waits
            failed = (
                masks[0]
                if lead_phi is not None and masks
                else torch.ones_like(eff, dtype=torch.bool)
            )
            usable = lead_phi if lead_phi is not None else eff
            buf, label, mine, miss = landing.offset(eff, usable, n, failed, r.rid)
            kept = landing.miss if landing.miss is not None else torch.zeros_like(miss)
            r.land_miss = torch.where(failed, kept, miss)
            self.publish(r.rid, OFFSET_STREAM, buf, label)
        offs = {
            p: pull(p, OFFSET_STREAM, landing.codec_at(r.rid)) for p in followers if p != self.site
        }
        r.guessed = tuple(offs)
        got = {p: f.result() for p, f in offs.items()}
        offsets = [mine if p == self.site else got[p][0] for p in followers]
        for p in r.agreed:
            d, cause = deltas[p].result() if p in deltas else (NO_DELTA, "")
            if p == lead:
                ph, why = lead_phi, lead_cause
            else:  # a follower's phi, rebuilt from its offset (its estimate)
                o, why = got[p]
                ph = None if o is None or lead_phi is None else lead_phi + n * o
            cause = cause or why or ("" if ph is not None else "landing")
            if d is not None and ph is not None:
                d, ph, cause = self._check(r, p, d, ph, cause)
            if d is None or ph is None:
                log.warning("round %d: partner %s dropped (%s); n = 1 for it", r.rid, p, cause)
            r.pulled[p] = (d, ph, cause)
        if all(r.pulled[p][0] is not None and r.pulled[p][1] is not None for p in r.agreed):
            point = landing.point(lead_phi, offsets)  # type: ignore[arg-type]
            r.land = point if self.site == lead else torch.where(failed, r.point, point)

    def _lead_sketched(self, r: Round, followers: list[str], pull) -> None:
        """The leader's phi frame under sketch windows (``loco.outer.phi_sketch``): pull every
        follower's sketch, encode the frame with windows sized from them (a failed pull: the
        history rule), publish it; ``r.out.phi`` becomes the leader's decoded phi."""
        jobs = {p: pull(p, SKETCH_STREAM, "sketch") for p in followers}
        got = [jobs[p].result()[0] for p in followers]
        sketches = (
            [self.payloads.own_blocks(g) for g in got] if all(g is not None for g in got) else None
        )
        buf, r.out.phi = self.payloads.encode_leader(r.t, r.window_momentum, sketches)
        self.publish(r.rid, "phi", buf, "lattice")

    def agree(self, r: Round) -> None:
        """The pairing agreement of ``r`` on this rank alone (``loco.gossip.agree_rpc``): fetch
        the other members' proposals, settle (this rank's gate opens to the group), refuse the
        proposed partners not in it. Any failure settles alone: the partner's pulls of this
        rank's range are refused at once instead of waiting for a settle that never comes."""
        try:
            got = self.node.exchange(r.proposal, self.pull_timeout_s)
            group, causes = got.group, got.causes
        except Exception as e:  # noqa: BLE001 (the round goes on alone)
            log.exception("round %d: the pairing agreement failed", r.rid)
            group, causes = (self.site,), {p: getattr(e, "cause", "error") for p in r.partners}
        self.node.settle(r.rid, group)
        r.refuse(causes)

    def _pull_sliced(self, r: Round) -> None:
        """DiLoCo's sliced reduce: ``r.mean``, and ``r.pulled`` saying which partners' deltas
        are in every average used (a placeholder delta) and why the others are not."""
        r.mean, used = self.sliced.run(r.rid, r.out.delta, r.out.phi, r.partners)
        for p, cause in used.items():
            r.pulled[p] = (torch.zeros(0), r.out.phi, "") if not cause else (None, None, cause)

    def _check(self, r: Round, p: str, d: torch.Tensor, ph: torch.Tensor, cause: str) -> Pulled:
        """``(d, ph, cause)`` of partner ``p``, or ``(None, None, "implausible")`` with a strike
        when they are implausible."""
        if self.method.sends_delta:
            bad = implausible(d, ph, r.out.delta, r.out.phi)
        else:
            bad = implausible_phi(ph, r.out.phi)
        if not bad:
            return d, ph, cause
        log.warning("round %d: partner %s sent an implausible payload: %s", r.rid, p, bad)
        if self.node is not None:
            self.node.reject(p, r.rid, "implausible", f"implausible payload: {bad}")
        return None, None, "implausible"

    @torch.no_grad()
    def merge(self, r: Round) -> Merged:
        """Apply round ``r`` (its pulls done) to the state and the engine; sync the engine."""
        ok = {p: v for p, v in r.pulled.items() if v[0] is not None and v[1] is not None}
        if r.mean is not None:  # sliced: one assembled mean, bitwise the same on every site
            if r.closing:
                return self._close(ok, r.mean)
            return self._apply(r, ok, [r.mean], [r.out.phi], 0.0, 0.0)
        members = sorted([(self.site, r.out.delta, r.out.phi)] + [(p, d, ph) for p, (d, ph, _) in ok.items()],
                         key=lambda m: m[0])  # fmt: skip
        if r.closing:
            return self._close(ok, torch.stack([m[1] for m in members]).mean(0))
        own = r.out.phi
        here = r.point  # what this site's phi stands for
        if len(members) == 1:
            deltas, phis = [r.out.delta], [r.out.phi]
        else:
            deltas, phis = [m[1] for m in members], [m[2] for m in members]
            if r.landing:  # pull onto the landing point, or nowhere when it failed
                phis = [r.land if r.land is not None else here]
                own = here
        if not self.method.sends_delta:  # the own exact delta alone (NoLoCo stepped)
            deltas = [r.out.delta]
        # consensus distance from the pulled phi (before the update); a phi rebuilt from a
        # landing offset carries that offset's coding noise times n, so it is not measured
        seen = {p: v for p, v in ok.items() if p not in r.guessed}
        sq = sum(float((ph - here).double().pow(2).sum()) for _, (_, ph, _) in seen.items())
        cnt = float(len(seen) * self.state.phi.numel()) if not self.all_live else 0.0
        return self._apply(r, ok, deltas, phis, sq, cnt, own)

    def _close(self, ok: dict[str, Pulled], mean: torch.Tensor) -> Merged:
        """A closing sync (DiLoCo's tails at the last step, ``OuterLoop._close_tails``):
        ``phi <- phi + mean(delta)`` and ``theta <- phi``, the momentum untouched: the sites
        end on the mean of their weights, with no outer step on a tail shorter than a round."""
        self.state.phi.add_(mean)
        self.flat.master().copy_(self.state.phi)
        self.flat.sync()
        return Merged(ok, 0.0, 0.0, (mean, self.state.phi))

    def _apply(self, r: Round, ok: dict[str, Pulled], deltas: list[torch.Tensor],
               phis: list[torch.Tensor], sq: float, cnt: float,
               own: torch.Tensor | None = None) -> Merged:  # fmt: skip
        """Apply the group's ``deltas`` / ``phis`` (the local step if they are refused)."""
        theta = self.flat.master()
        carry = r.boundary  # merge "carry": becomes the overlap's own progress, in place
        if carry is not None:
            carry.neg_().add_(theta)
        theta_local = theta.clone() if r.thread is not None and carry is None else None
        own = r.out.phi if own is None else own
        try:
            self.method.apply(theta, self.state, deltas, phis, own=own)
            if r.land is not None and ok:  # the group landed
                self._landing().landed(r.land_miss)  # type: ignore[union-attr]
        except ValueError as e:  # cannot happen with checked payloads; never apply a bad value
            log.warning("round %d: %s; local step instead", r.rid, e)
            ok, sq, cnt = {}, 0.0, 0.0
            deltas, phis = [r.out.delta], [r.out.phi]
            self.method.apply(theta, self.state, deltas, phis, own=r.out.phi)
        # no group mean of the deltas where none travels: each member used its own
        mean_delta = torch.stack(deltas).mean(0) if self.method.sends_delta else NO_DELTA
        means = (mean_delta, torch.stack(phis).mean(0))
        if carry is not None:
            theta.add_(carry)
            r.boundary = None
        elif theta_local is not None:
            theta.mul_(1 - self.mix).add_(theta_local, alpha=self.mix)
        self.flat.sync()
        return Merged(ok, sq, cnt, means)
