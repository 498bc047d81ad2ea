"""How many bits per value a phi exchange needs: a toy model of coded phi, no training.

The toy of ``spread.py`` (N sites, white-noise deltas, random pairs, the real ``NoLoCo`` update in
the default form: weights, Nesterov, alpha 0.9, beta 0.7, gamma 1), with each site's phi reaching
its partner through a code. The pull uses the decoded values only (as ``loco.outer`` does), so a
code moves no pair's mean; a block that fails its check gets no pull on either side. Prints one
JSON line per code: the bits per value it sends (values plus a block's 6-byte step and check) and
the consensus distance (RMS distance of each site to its partner before the pull, mean over the
second half of the rounds) against exact phi's.

Codes:

- ``lattice``: the modulo lattice of ``loco/outer/lattice.py`` (``bits`` per value; a block's step
  from the largest partner difference the sender observed, times ``margin``).
- ``subsample``: exact values on a fraction of the blocks per round (a seed both ends share), no
  pull on the others: the limit of any design that sends a sparse part of phi each round.
- ``bound``: the Wyner-Ziv bound for a Gaussian difference with the partner's phi as side
  information: the decoded value is phi plus noise of variance ``var(diff) 2^(-2 rate)``. Not a
  code (the noise uses the difference, which the sender does not know): the best any code at
  that rate can do on this toy.

Sequential landing (``run_sequential``): one member of each pair (the leader) sends its phi
through a code decoded next to the follower's phi; the follower computes the pair's mean from it
and sends the leader the mean's offset from the leader's DECODED phi (a value both ends know, so
any plain code serves: ``sign`` or ``ternary`` with a per-block scale); both land on the same
point, so coding noise moves the pair but never parts it. A site's bytes are half of the two
messages. ``feedback``: each site remembers how far its landing missed the exact mean of the
pair and subtracts it from its phi the next time it is coded (the miss is not carried forward).
``oracle`` windows size a block's step from the pair's own largest difference: not a code a
sender can run alone (it needs the partner's phi), the limit of a window sized from a sketch of
the pair's distance sent ahead of phi.

    python scripts/experiments/phi_rate.py          # ~8 min on one core
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loco.outer.methods import NoLoCo, OuterState  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spread import pair_rounds  # noqa: E402  (the toy's rounds, shared with spread.py)

BLOCK = 256
FORM = {"alpha": 0.9, "beta": 0.7, "gamma": 1.0, "consensus": "weights", "nesterov": True}
BLOCK_BITS = 6 * 8  # a block's bf16 step and 32-bit check
# (sender's phi, receiver's phi, sender's observed spread per block, round) -> (decoded, ok per block)
Code = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def exact(phi: torch.Tensor, ref: torch.Tensor, spread: torch.Tensor, t: int):
    return phi.clone(), torch.ones(phi.numel() // BLOCK, dtype=torch.bool)


def lattice(bits: int, margin: float, fix: int = 0) -> Code:
    """``fix``: a block with at most this many values on the wrong grid point is repaired (a
    linear check, sums of the indices with distinct weights, would locate one such value)."""
    half = 2 ** (bits - 1) - 1

    def code(phi, ref, spread, t):
        s = (margin * spread / half).clamp_min(1e-6).repeat_interleave(BLOCK)
        q = torch.round(phi / s)
        mod = 2**bits
        # the receiver: the grid point with q's residue nearest to its own phi
        base = torch.round(ref / s)
        r = torch.remainder(q - base, mod)
        r = torch.where(r > mod // 2, r - mod, r)
        got = base + r
        wrong = (got != q).view(-1, BLOCK).sum(1)
        ok = wrong <= fix
        return torch.where(ok.repeat_interleave(BLOCK), q, got) * s, ok

    return code


def subsample(fraction: float) -> Code:
    def code(phi, ref, spread, t):
        g = torch.Generator().manual_seed(t)
        ok = torch.rand(phi.numel() // BLOCK, generator=g) < fraction
        return phi.clone(), ok

    return code


def bound(rate: float) -> Code:
    gen = torch.Generator().manual_seed(1)

    def code(phi, ref, spread, t):
        d = (phi - ref).view(-1, BLOCK)
        sd = d.pow(2).mean(1, keepdim=True).sqrt() * 2 ** (-rate)
        noise = torch.randn(d.shape, generator=gen) * sd
        return phi + noise.view(-1), torch.ones(d.shape[0], dtype=torch.bool)

    return code


def run(code: Code, *, sites: int = 4, rounds: int = 300, dim: int = 4096, seed: int = 0,
        decay: float = 0.5) -> tuple[float, float]:  # fmt: skip
    """(consensus distance, failed block fraction) over the second half of the rounds.
    ``decay``: per round, of the largest partner difference a site remembers per block."""
    step = NoLoCo(**FORM)
    states = [OuterState.start(torch.zeros(dim)) for _ in range(sites)]
    nb = dim // BLOCK
    spread = [torch.full((nb,), 1.0) for _ in range(sites)]  # a generous first window
    dist, fails = [], []
    for t, noise, pairs in pair_rounds(sites, rounds, dim, seed):
        phis = [s.phi.clone() for s in states]
        for i, j in pairs:
            dec_j, ok_j = code(phis[j], phis[i], spread[j], t)  # j's phi as i decodes it
            dec_i, ok_i = code(phis[i], phis[j], spread[i], t)
            ok_b = ok_i & ok_j
            ok = ok_b.repeat_interleave(BLOCK)
            # a failed block: no pull there on either side (both keep their own phi)
            for me, own, seen in ((i, dec_i, dec_j), (j, dec_j, dec_i)):
                own = torch.where(ok, own, phis[me])
                seen = torch.where(ok, seen, phis[me])
                diff = (seen - phis[me]).abs().view(-1, BLOCK).amax(1)
                # as spread.Spread (decay 1/2): the largest difference seen; a failed block x4
                spread[me] = torch.where(
                    ok_b, torch.maximum(diff, spread[me] * decay), spread[me] * 4
                )
                try:
                    step.apply(torch.empty(dim), states[me], [noise[i], noise[j]], [own, seen], own)
                except ValueError:  # the spread ran away past the float range
                    return math.inf, math.nan
            if t >= rounds // 2:
                dist.append(float((phis[i] - phis[j]).pow(2).mean().sqrt()))
                fails.append(1.0 - float(ok_b.float().mean()))
    return float(np.mean(dist)), float(np.mean(fails))


def rows() -> list[tuple[str, Code, float, float]]:
    """(name, code, bits per value, decay of the remembered spread)."""
    out: list[tuple[str, Code, float, float]] = [("exact", exact, 32.0, 0.5)]
    for bits, margin in ((8, 8), (4, 2), (3, 2), (3, 1.5), (2, 1.5), (2, 1.0)):
        out.append((f"lattice {bits} bits, margin {margin}", lattice(bits, margin),
                    bits + BLOCK_BITS / BLOCK, 0.5))  # fmt: skip
    for bits, margin, fix in ((4, 2, 0), (4, 1.5, 1), (3, 1.5, 1)):
        out.append((f"lattice {bits} bits, margin {margin}, decay 0.9, {fix} repaired",
                    lattice(bits, margin, fix), bits + BLOCK_BITS / BLOCK, 0.9))  # fmt: skip
    for f in (0.5, 0.05):
        out.append((f"subsample {f} of the blocks, exact", subsample(f), 32 * f, 0.5))
    for rate in (3.0, 2.0, 1.6, 1.4, 1.0):
        out.append((f"bound at {rate} bits", bound(rate), rate + BLOCK_BITS / BLOCK, 0.5))
    return out


# --- sequential landing -------------------------------------------------------------------

PlainCode = Callable[[torch.Tensor], torch.Tensor]  # both ends know the reference
PLAIN_BITS = {"sign": 1 + 16 / BLOCK, "ternary": 1.6 + 16 / BLOCK}  # 5 trits a byte, bf16 scale


def plain(kind: str) -> PlainCode:
    """``sign``: the sign times the block's mean magnitude; ``ternary``: -1/0/+1 with a zero band
    of 0.6 mean magnitudes, times the mean magnitude of the values kept."""

    def code(x: torch.Tensor) -> torch.Tensor:
        b = x.view(-1, BLOCK)
        scale = b.abs().mean(1, keepdim=True)
        if kind == "sign":
            return (b.sign() * scale).view(-1)
        t = torch.where(b.abs() > 0.6 * scale, b.sign(), torch.zeros_like(b))
        kept = (b.abs() * t.abs()).sum(1, keepdim=True) / t.abs().sum(1, keepdim=True).clamp_min(1)
        return (t * kept).view(-1)

    return code


def plain_bound(rate: float) -> PlainCode:
    """The rate-distortion limit of a Gaussian block: noise of variance ``var 2^(-2 rate)``."""
    gen = torch.Generator().manual_seed(2)

    def code(x: torch.Tensor) -> torch.Tensor:
        b = x.view(-1, BLOCK)
        sd = b.pow(2).mean(1, keepdim=True).sqrt() * 2 ** (-rate)
        return x + (torch.randn(b.shape, generator=gen) * sd).view(-1)

    return code


def oracle_lattice(residues: int, margin: float) -> Code:
    """Modulo ``residues`` on a block grid whose window, (residues-1)/2 steps either side, is
    ``margin`` times the pair's own largest difference in the block (an even count of residues
    reaches one step less below than above: it needs a margin above 1)."""

    def code(phi, ref, spread, t):
        big = (phi - ref).abs().view(-1, BLOCK).amax(1)
        s = (margin * big / ((residues - 1) / 2)).clamp_min(1e-9).repeat_interleave(BLOCK)
        q, base = torch.round(phi / s), torch.round(ref / s)
        r = torch.remainder(q - base, residues)
        r = torch.where(r > residues // 2, r - residues, r)
        return q * s, ((base + r) == q).view(-1, BLOCK).all(1)

    return code


def sketch_lattice(residues: int, margin: float, k: int = 64, decay: float = 0.9) -> Code:
    """Modulo ``residues``, a block's window sized by what a sender can know: the pair's RMS
    distance from ``k`` shared random projections of each phi (the partner's sketch, sent ahead
    of phi), times a per-block profile (largest difference over the RMS distance) that the
    sender remembers from its past pairs. The third argument is the sender's own memory (a
    dict)."""
    gen = torch.Generator().manual_seed(5)

    def code(phi, ref, memory, t):
        proj = torch.randn(k, phi.numel(), generator=gen) / phi.numel() ** 0.5
        g = float((proj @ phi - proj @ ref).pow(2).mean().sqrt())
        prof = memory.get("profile", torch.full((phi.numel() // BLOCK,), 4.0))
        s = margin * max(g, 1e-12) * prof / ((residues - 1) / 2)
        s = s.clamp_min(1e-9).repeat_interleave(BLOCK)
        q, base = torch.round(phi / s), torch.round(ref / s)
        r = torch.remainder(q - base, residues)
        r = torch.where(r > residues // 2, r - residues, r)
        ok = ((base + r) == q).view(-1, BLOCK).all(1)
        if g > 1e-9:  # after the round the pair knows the block's difference (or its failure)
            seen = ((phi - ref).abs().view(-1, BLOCK).amax(1) / g).clamp_min(1.0)
            memory["profile"] = torch.where(ok, torch.maximum(seen, prof * decay), prof * 1.5)
        return q * s, ok

    return code


def history_lattice(bits: int, margin: float) -> Code:
    """The lattice as ``loco.outer`` runs it: a block's window from the largest difference the
    sender saw there when it last followed (``memory["spread"]``, kept by ``run_sequential``
    as ``spread.Spread`` does); 8 bits and a wide window before any."""
    code = lattice(bits, margin)

    def first(phi, ref, memory, t):
        seen = memory.get("spread")
        if seen is None:
            return lattice(8, 1.0)(phi, ref, torch.full((phi.numel() // BLOCK,), 16.0), t)
        return code(phi, ref, seen, t)

    return first


def run_sequential(first: Code, second: PlainCode, *, feedback: bool | str, sites: int = 4,
                   rounds: int = 300, dim: int = 4096,
                   seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(consensus distance, failed block fraction) of the sequential landing; a block whose
    first message fails its check is not pulled (both keep their phi there). ``feedback``:
    True, each member feeds back the whole miss (known only to an observer of both phis);
    ``"partial"``, what ``loco.outer.landing`` does: the leader its coding error over n, the
    follower its offset's coding error; ``"partial-sum"``, those parts times n."""
    step = NoLoCo(**FORM)
    states = [OuterState.start(torch.zeros(dim)) for _ in range(sites)]
    miss = [torch.zeros(dim) for _ in range(sites)]
    memory: list[dict] = [{} for _ in range(sites)]  # each leader's own (sketch windows)
    dist, fails = [], []
    for t, noise, pairs in pair_rounds(sites, rounds, dim, seed):
        phis = [s.phi.clone() for s in states]
        for i, j in pairs:  # leader, follower
            pi, pj = (phis[i] - miss[i], phis[j] - miss[j]) if feedback else (phis[i], phis[j])
            sent, ok_b = first(pi, pj, memory[i], t)  # type: ignore[arg-type]
            ok = ok_b.repeat_interleave(BLOCK)
            exact = torch.where(ok, (pj - sent) / 2, torch.zeros(dim))
            offset = second(exact)
            land, mean = sent + offset, (pi + pj) / 2
            seen = torch.where(ok, sent - pj, torch.zeros(dim)).abs().view(-1, BLOCK).amax(1)
            old = memory[j].get("spread", seen)  # the follower decoded: spread.Spread's rule
            memory[j]["spread"] = torch.where(ok_b, torch.maximum(seen, old * 0.5), old * 4)
            for me in (i, j):
                try:
                    step.apply(torch.empty(dim), states[me], [noise[i], noise[j]],
                               [torch.where(ok, land, phis[me])], phis[me])  # fmt: skip
                except ValueError:  # ran away past the float range
                    return math.inf, math.nan
                if feedback is True:
                    miss[me] = torch.where(ok, land - mean, miss[me])
            if feedback in ("partial", "partial-sum"):
                # "partial-sum": each its part times n, so the parts add up to the pair's whole
                # excess (n times the miss), as the whole miss fed back by both does
                k = 2.0 if feedback == "partial-sum" else 1.0
                miss[i] = torch.where(ok, k * (sent - pi) / 2, miss[i])
                miss[j] = torch.where(ok, k * (offset - exact), miss[j])
            if t >= rounds // 2:
                dist.append(float((phis[i] - phis[j]).pow(2).mean().sqrt()))
                fails.append(1.0 - float(ok_b.float().mean()))
    return float(np.mean(dist)), float(np.mean(fails))


def sequential_rows() -> list[tuple[str, Code, PlainCode, float, bool | str]]:
    """(name, first code, second code, bits per value a site sends, feedback)."""
    out: list[tuple[str, Code, PlainCode, float, bool | str]] = []
    for rate, fb in ((1.3, False), (1.3, True), (1.3, "partial"), (2.0, "partial"), (1.0, True),
                     (0.6, True)):  # fmt: skip
        sent = rate + (BLOCK_BITS + 16) / BLOCK / 2
        kind = {True: ", feedback", False: "", "partial": ", partial feedback"}[fb]
        out.append((f"sequential, bound {rate} + {rate} bits{kind}",
                    bound(rate), plain_bound(rate), sent, fb))  # fmt: skip
    for res, margin, second, fb in ((3, 1.0, "ternary", False), (3, 1.0, "ternary", True),
                                    (3, 1.0, "sign", True), (8, 1.2, "sign", False),
                                    (8, 1.2, "sign", True)):  # fmt: skip
        bits = (math.log2(res) if res != 3 else 1.6) + BLOCK_BITS / BLOCK + PLAIN_BITS[second]
        out.append((f"sequential, mod-{res} lattice (oracle window x{margin}) + {second}"
                    + (", feedback" if fb else ""), oracle_lattice(res, margin), plain(second),
                    bits / 2, fb))  # fmt: skip
    for bits in (8, 6):  # what loco.outer runs: today's windows, ternary offsets, partial
        sent = (bits + BLOCK_BITS / BLOCK + PLAIN_BITS["ternary"]) / 2
        out.append((f"sequential, {bits}-bit lattice (windows from past partners, margin 8) + "
                    "ternary, partial feedback", history_lattice(bits, 8.0), plain("ternary"),
                    sent, "partial"))  # fmt: skip
    for res, second in ((3, "ternary"), (5, "sign"), (5, "ternary"), (8, "sign"), (8, "ternary")):
        bits = (math.log2(res) if res != 3 else 1.6) + BLOCK_BITS / BLOCK + PLAIN_BITS[second]
        out.append((f"sequential, mod-{res} lattice (sketch window x1.5) + {second}, feedback",
                    sketch_lattice(res, 1.5), plain(second), bits / 2, True))  # fmt: skip
    # which miss is fed back: each member's own part (what loco.outer.landing knows), the parts
    # times n (they add up to the pair's whole excess), none
    bits = math.log2(5) + BLOCK_BITS / BLOCK + PLAIN_BITS["sign"]
    for fb in ("partial", "partial-sum", False):
        out.append((f"sequential, mod-5 lattice (sketch window x1.5) + sign, feedback {fb}",
                    sketch_lattice(5, 1.5), plain("sign"), bits / 2, fb))  # fmt: skip
    return out


def window_surprise(sites: int = 4, rounds: int = 300, dim: int = 4096, seed: int = 0) -> dict:
    """Why a window sized from past partners fails: a block's largest difference to this round's
    partner over its mean difference to the last one (exact phi), percentiles 50/90/99, for a
    partner met again and a new one."""
    step = NoLoCo(**FORM)
    states = [OuterState.start(torch.zeros(dim)) for _ in range(sites)]
    last: list = [None] * sites
    met: dict[int, int] = {}
    ratio: dict[bool, list[float]] = {True: [], False: []}
    for t, noise, pairs in pair_rounds(sites, rounds, dim, seed):
        phis = [s.phi.clone() for s in states]
        for i, j in pairs:
            d = (phis[i] - phis[j]).abs().view(-1, BLOCK)
            if t >= rounds // 2 and last[i] is not None:
                ratio[met.get(i) == j].append(float((d.amax(1) / last[i]).max()))
            last[i] = last[j] = d.mean(1)
            met[i], met[j] = j, i
            for me in (i, j):
                step.apply(torch.empty(dim), states[me], [noise[i], noise[j]], [phis[i], phis[j]])
    return {("again" if k else "new"): [round(float(v), 1) for v in np.percentile(r, [50, 90, 99])]
            for k, r in ratio.items()}  # fmt: skip


def main() -> None:
    ref, _ = run(exact)
    for name, code, bits, decay in rows():
        d, failed = run(code, decay=decay)
        print(json.dumps({"code": name, "bytes_per_value": round(bits / 8, 3),
                          "distance": round(d, 4), "vs_exact": round(d / ref, 3),
                          "failed_blocks": round(failed, 4),
                          "finite": math.isfinite(d)}), flush=True)  # fmt: skip
    print(json.dumps({"window_surprise": window_surprise()}), flush=True)
    for res in (8, 16):  # the two-way exchange with the pair's own window: what the window costs
        d, failed = run(oracle_lattice(res, 1.2))
        print(json.dumps({"code": f"mod-{res} lattice (oracle window x1.2)",
                          "bytes_per_value": round((math.log2(res) + BLOCK_BITS / BLOCK) / 8, 3),
                          "distance": round(d, 4), "vs_exact": round(d / ref, 3),
                          "failed_blocks": round(failed, 4)}), flush=True)  # fmt: skip
    for name, first, second, bits, fb in sequential_rows():
        d, failed = run_sequential(first, second, feedback=fb)
        print(json.dumps({"code": name, "bytes_per_value": round(bits / 8, 3),
                          "distance": round(d, 4), "vs_exact": round(d / ref, 3),
                          "failed_blocks": round(failed, 4),
                          "finite": math.isfinite(d)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
