"""The final average (``outer.final_average``, NoLoCo only), after the last inner step.

Every site publishes its weights (stream ``final``, round ``last // H + 1``), pulls every other
live site's, and sets ``theta = phi =`` their mean in site order: the sites end with one model.

With ``outer.final_lattice`` (the default of ``outer=noloco``) the weights travel as an 8-bit
lattice frame (:mod:`loco.outer.lattice`) decoded next to the receiver's own weights, about 1.02
bytes per value per peer instead of 4. Its window per block is the momentum rule's (16 times
the block's largest outer-momentum value, the window of a first-round phi frame), widened where
the peers' sketches (:mod:`loco.outer.phi_sketch`, stream ``final_sketch``: 4 bytes a block,
each site publishes its own and pulls the others' first) show the weights farther apart: to 32
times the estimated rms difference to the farthest peer (:func:`phi_sketch.final_steps`). The
momentum says how far one round moves the weights, not how far apart sites are that stepped
alone between meetings or met other partners. A peer's sketch can widen a frame's window to
twice the block's largest weight either side, no more. Each site's share of the mean is then
its frame's grid points, which every receiver decodes bit for bit, so the sites still end with
one model. A block that fails its check at a receiver is not guessed: the receiver pulls the
sender's exact weights of the failed blocks (stream ``final_raw``, published beside the frame;
at most ``MAX_RAW_SPANS`` range pulls, :func:`failed_spans`) and computes the sender's grid
points there itself (:func:`lattice.grid_points`).
Without it the weights go raw, one exact copy per peer.

Implausible weights (``loco.outer.plausible.implausible_phi``) earn a strike and are left out; a
site that does not answer in time is left out too, on every rank of the site alike (the ranks
agree on who answered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from loco.compress import PayloadError
from loco.outer import lattice, phi_sketch
from loco.outer.exchange import LATTICE_BLOCK, RangePayloads
from loco.outer.flat_view import FlatView
from loco.outer.methods import OuterState
from loco.outer.plausible import implausible_phi
from loco.outer.stats import OuterStats, mean_crc

log = logging.getLogger("loco.outer.loop")  # the outer loop's log lines, as before the split

FINAL_STREAM = "final"
FINAL_RAW_STREAM = "final_raw"  # the exact weights beside a lattice frame, for a failed block
FINAL_SKETCH_STREAM = "final_sketch"  # the weights' per-block sketch, sizing the peers' windows
FINAL_BITS = 8
MAX_RAW_SPANS = 16  # raw pulls of a peer's exact weights for its failed blocks, at most


class FinalAverage:
    """Runs the final average of one rank (see the module docstring).

    Args:
        flat, state: the engine's flat view and the outer state (both set to the mean).
        node, payloads: the rank's ``GossipNode`` and :class:`RangePayloads`.
        site: this site's name. live: the site's live sites (collective: rank 0's, broadcast).
        pool: the pull threads. pull_timeout_s: deadline of one pull (None: the node's).
        stats: the loop's :class:`OuterStats` (sums over the site, totals, the ``outer`` line).
        say: one line for the operator.
        lattice: send the weights as an 8-bit lattice frame (module docstring); False: raw.
    """

    def __init__(self, *, flat: FlatView, state: OuterState, node: Any,
                 payloads: RangePayloads, site: str, live: Callable[[], list[str]],
                 pool: ThreadPoolExecutor, pull_timeout_s: float | None, stats: OuterStats,
                 say: Callable[[str], None], lattice: bool = False) -> None:  # fmt: skip
        self.flat, self.state, self.node, self.payloads = flat, state, node, payloads
        self.lattice = lattice
        self.site, self.live, self.pool, self.pull_timeout_s = site, live, pool, pull_timeout_s
        self.stats, self.say = stats, say

    @torch.no_grad()
    def run(self, done: int, t: int) -> dict[str, Any]:
        """Average after inner step ``done`` as round ``t``; returns the record (the ``outer``
        line's fields plus ``peers``, the peers asked, and ``served_before``, the node's
        served-pulls mark before publishing). Collective."""
        t0 = time.perf_counter()
        theta = self.flat.master()
        exact = theta.detach().float().cpu().clone()
        served = self.node.served_mark()
        peers = [s for s in self.live() if s != self.site]
        own = self._publish(t, exact, peers)
        got = self._pull(t, own, peers)
        kept = self._agree(peers, got)
        members = sorted([(self.site, own)] + [(p, got[p][0]) for p in kept], key=lambda m: m[0])
        vals = [m[1] for m in members]
        sq = sum(float((v - own).double().pow(2).sum()) for v in vals)
        mean = torch.stack(vals).mean(0)
        theta.copy_(mean.to(theta.device, theta.dtype))
        self.state.phi.copy_(mean)
        self.flat.sync()
        raw_pulls = float(sum(1 for p in peers if got[p][2]))
        sent, recv, sq_all, cnt_all, raw_all = self.stats.gossip_sums(
            (sq, float(len(kept) * own.numel()), raw_pulls)
        )
        left_out = [f"{p}:{got[p][1] or 'rank'}" for p in peers if p not in kept]
        rec = dict(final=True, partner=",".join(m[0] for m in members if m[0] != self.site),
                   n=len(vals), dropped=",".join(left_out), bytes_sent=sent, bytes_recv=recv,
                   round_seconds=time.perf_counter() - t0,
                   consensus_distance=(sq_all / cnt_all) ** 0.5 if cnt_all else None,
                   mean_crc=mean_crc((mean,)), final_codec="lattice" if self.lattice else "raw",
                   final_raw_pulls=raw_all)  # fmt: skip
        # what the peers pull of this rank: the frame (or raw weights) and, with lattice frames,
        # the sketch first
        owed = len(peers) * (2 if self.lattice else 1)
        final = {"peers": len(peers), "owed": owed, "served_before": served, **rec}
        if left_out:
            self.say(f"final average: {', '.join(left_out)} left out; averaged {len(vals)} sites")
        self.stats.log(done, t, rec)
        return final

    def _publish(self, t: int, exact: torch.Tensor, peers: list[str]) -> torch.Tensor:
        """Publish this rank's weights; returns its share of the mean (the lattice frame's grid
        points, or ``exact`` itself when raw). A lattice frame's windows come from the peers'
        sketches (module docstring): this rank publishes its own sketch and exact weights,
        pulls the peers' sketches, then encodes and publishes the frame."""
        raw = self.payloads.raw(exact)
        if not self.lattice:
            self.node.publish(t, FINAL_STREAM, raw, codec="raw")
            return exact
        x = torch.from_numpy(raw)
        own = phi_sketch.sketch(x, phi_sketch.signs(self.payloads.slo, x.numel()), LATTICE_BLOCK)
        self.node.publish(t, FINAL_RAW_STREAM, raw, codec="raw")
        self.node.publish(t, FINAL_SKETCH_STREAM, phi_sketch.frame(own, x.numel(), LATTICE_BLOCK),
                          codec="sketch")  # fmt: skip
        jobs = [self.pool.submit(self.payloads.pull, self.node, p, t, FINAL_SKETCH_STREAM,
                                 self.pull_timeout_s, "sketch") for p in peers]  # fmt: skip
        got = (j.result()[0] for j in jobs)
        others = [self.payloads.own_blocks(v, own, LATTICE_BLOCK) for v in got if v is not None]
        mom = torch.from_numpy(self.payloads.raw(self.state.momentum))
        steps = phi_sketch.final_steps(x, mom, own, others, LATTICE_BLOCK, FINAL_BITS)
        buf, grid = lattice.encode(x, mom, block=LATTICE_BLOCK, bits=FINAL_BITS, steps=steps)
        self.node.publish(t, FINAL_STREAM, buf, codec="lattice")
        return grid[: exact.numel()].clone()

    def _pull(self, t: int, own: torch.Tensor, peers: list[str]) -> dict[str, Any]:
        """Every peer's share ``(values or None, cause, pulled its raw weights)``; implausible
        ones earn a strike."""
        if self.lattice:  # decoded next to our own share, padded to the shard once
            one = partial(self._pull_lattice, ref=torch.from_numpy(self.payloads.raw(own)))
        else:
            one = self._pull_raw
        jobs = {p: self.pool.submit(one, p, t) for p in peers}
        got = {p: jobs[p].result() for p in peers}
        for p, (v, _, fell) in got.items():
            if v is not None and (bad := implausible_phi(v, own)):
                log.warning("final average: %s sent implausible weights: %s", p, bad)
                self.node.strike(p, t, f"implausible final weights: {bad}")
                got[p] = (None, "implausible", fell)
        return got

    def _pull_raw(self, peer: str, t: int) -> tuple[Any, str, bool]:
        v, cause = self.payloads.pull(self.node, peer, t, FINAL_STREAM, self.pull_timeout_s, "none")
        return v, cause, False

    def _pull_lattice(self, peer: str, t: int, *, ref: torch.Tensor) -> tuple[Any, str, bool]:
        """A peer's lattice frame decoded next to ``ref`` (this rank's share, padded to its
        shard); where a block failed, the peer's grid points from its exact weights (one more
        pull)."""
        pl = self.payloads
        if pl.numel == 0:  # a trailing rank whose shard is all padding owns nothing
            return torch.zeros(0), "", False
        values: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []

        def check(buf, numel: int, seg_lo: int) -> None:
            mv = memoryview(buf).cast("B")
            if lattice.frame_rotated(mv):
                raise PayloadError("a final frame is never rotated")
            seg = lattice.decode_segment(mv, numel, seg_lo, ref, shard=(pl.slo, pl.shi),
                                         owned=(pl.lo, pl.hi), max_numel=pl.max_numel)  # fmt: skip
            d = seg.decoded
            if not d.bits or d.steps is None:
                raise PayloadError("a final frame without values")
            values.append(d.values)
            masks.append(seg.bad)
            steps.append(d.steps.repeat_interleave(d.block)[:numel])

        kw: dict[str, Any] = {"validate": check, "codec": "lattice",
                              "segment_bytes": pl.segment_bytes("lattice")}  # fmt: skip
        if self.pull_timeout_s is not None:
            kw["timeout_s"] = self.pull_timeout_s
        res = self.node.pull(peer, t, FINAL_STREAM, lo=pl.lo, hi=pl.hi, **kw)
        if not res.ok:
            return None, res.cause, False
        try:
            got = pl.assemble(res, values, FINAL_STREAM)
            bad = pl.assemble(res, masks, FINAL_STREAM) > 0.5
            step = pl.assemble(res, steps, FINAL_STREAM)
        except PayloadError as e:
            self.node.reject(peer, t, "bad_payload", f"final does not assemble: {e}")
            return None, "bad_payload", False
        if not bool(bad.any()):
            return got, "", False
        exact, cause = self._pull_exact(peer, t, bad)
        if exact is None:
            return None, cause, True
        got[bad] = lattice.grid_points(exact[bad], step[bad])
        log.warning("final average: %s", _miss(peer, exact, ref[: pl.numel], step, bad))
        return got, "", True

    def _pull_exact(self, peer: str, t: int, bad: torch.Tensor) -> tuple[Any, str]:
        """``peer``'s exact weights where ``bad`` (this rank's range; zero elsewhere): one raw
        pull per span of :func:`failed_spans`, so a miss costs 4 bytes a value of the failed
        blocks and at most :data:`MAX_RAW_SPANS` pulls. ``(values, "")`` or ``(None, cause)``."""
        pl = self.payloads
        out = torch.zeros(pl.numel, dtype=torch.float32)

        def finite(buf, numel: int, lo: int) -> None:
            if not bool(torch.isfinite(torch.frombuffer(buf, dtype=torch.float32)).all()):
                raise PayloadError("exact weights hold NaN/Inf")

        kw: dict[str, Any] = {"codec": "raw", "validate": finite}
        if self.pull_timeout_s is not None:
            kw["timeout_s"] = self.pull_timeout_s
        for a, b in failed_spans(bad, MAX_RAW_SPANS):
            res = self.node.pull(peer, t, FINAL_RAW_STREAM, lo=pl.lo + a, hi=pl.lo + b,
                                 out=out[a:b].numpy(), **kw)  # fmt: skip
            if not res.ok:
                return None, res.cause
        return out, ""

    def _agree(self, peers: list[str], got: dict[str, Any]) -> set[str]:
        """The peers that answered on every rank of the site (collective when world > 1)."""
        ok = [float(got[p][0] is not None) for p in peers]
        if peers:  # the same members on every rank of the site
            ok = self.stats.comm.min(ok)
        return {p for p, k in zip(peers, ok, strict=True) if k > 0}


def failed_spans(bad: torch.Tensor, most: int) -> list[tuple[int, int]]:
    """The runs ``[a, b)`` of True in ``bad``, neighbours joined over the smallest gaps until
    at most ``most`` remain (the ``most - 1`` widest gaps stay); they cover every True value."""
    flags = bad.to(torch.int8)
    edges = torch.diff(torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)])).nonzero()
    starts, ends = edges.flatten()[0::2], edges.flatten()[1::2]
    if starts.numel() > max(1, most):
        keep = torch.topk(starts[1:] - ends[:-1], max(1, most) - 1).indices.sort().values
        starts = torch.cat([starts[:1], starts[keep + 1]])
        ends = torch.cat([ends[keep], ends[-1:]])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _miss(peer: str, exact: torch.Tensor, own: torch.Tensor, step: torch.Tensor,
          bad: torch.Tensor) -> str:  # fmt: skip
    """One line on the blocks of ``peer``'s final frame that failed here: how many, and the
    worst one's distance against its window (``2**(FINAL_BITS-1) - 1`` steps either side) and
    its largest weight (values of this rank's range, ``own`` this rank's share)."""
    half = float(2 ** (FINAL_BITS - 1) - 1)
    idx = bad.nonzero().flatten()
    blocks = torch.unique(idx // LATTICE_BLOCK)
    gap = (exact[idx] - own[idx]).abs()
    ratio = gap / (step[idx] * half)
    w = int(idx[int(ratio.argmax())])
    b = slice(w - w % LATTICE_BLOCK, w - w % LATTICE_BLOCK + LATTICE_BLOCK)
    pulled = bad[b]  # the values of the block this rank pulled exact
    return (f"{peer}'s frame failed {blocks.numel()} blocks here (rebuilt from its exact "
            f"weights); the worst at value {w}: {float(ratio.max()):.2f}x its window "
            f"{float(step[w]) * half:.3g}, the block's largest weight {float(exact[b][pulled].abs().max()):.3g}, "
            f"largest difference {float((exact[b] - own[b])[pulled].abs().max()):.3g}")  # fmt: skip
