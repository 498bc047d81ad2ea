"""Quality at a fixed token budget: DDP vs DiLoCo vs NoLoCo vs the frontier, seeds and spread.

Every method sees the same tokens: 4 workers x ``batch`` sequences x ``steps`` steps (8 workers
for the ``-8`` rows, each with the same per-worker batch).

- ``ddp``: ONE site with 4 ranks (``site.nproc=4``, ZeRO stage 0: gradients all-reduced every
  step; ``outer.H`` past the last step, so no outer round), the exact data-parallel baseline;
  its bytes are what a ring all-reduce moves (2 x 4 bytes per parameter per step per worker).
- ``diloco``: 4 sites, all in one group every H steps (outer Nesterov SGD, lr 0.7, momentum 0.9),
  fp32 deltas; ``diloco-8``: the same at 8 sites, the reference of the ``-8`` rows.
- ``noloco``: 4 sites, random pairs every H steps (n = 2), int8 deltas, exact phi; ``NOLOCO``
  below: DiLoCo's outer optimizer on the pair's mean delta, the gamma pull on phi directly,
  and the final average over the sites after the last step.
- ``frontier``: ``noloco`` with sparse 2-bit deltas (``compression=sparse``) and coded phi
  (``FRONTIER``); ``frontier-fragments`` adds streaming fragments; ``frontier-8`` runs 8 sites.
- ``frontier-sign`` (``-8``: 8 sites): DiLoCo with one-bit deltas (``compression=sign``) and
  error feedback over the sliced reduce; phi is the same on every site, so nothing else moves.
  ``frontier-sign-fragments`` (``-8``): the same with streaming fragments (each sync reduces its
  fragment sliced); ``diloco-fragments``: fp32 DiLoCo with the same fragments, its reference.
- ``frontier-ternary`` (``-8``, ``-fragments``): the same reduce with ternary deltas and
  one-bit slice averages (``compression=ternary-sign``) at outer momentum 0.8 and outer lr
  1.3: 0.2499 bytes/param/round at 4 sites.
- ``noloco-frontier`` (``-8``): NoLoCo with ternary deltas, the 8-bit lattice phi and outer
  momentum 0.8; ``noloco-stepped``: the defaults, each member stepping on its own delta and
  the pair landing on the mean of the stepped points (no delta sent; ``STEPPED``);
  ``noloco-meet2``: the same, the pairs meeting every other round after the first 10, the
  leader's frame at 3 bits (``MEET2``: 0.23 bytes/param/round at 80 rounds);
  ``noloco-meet2-4``: meetings every other round from the start at 4 bits in blocks of 1024,
  the last two meetings finer (``MEET2_4``: the exchange at <= 0.2 bytes/param/round);
  ``noloco-landing``: the same pairs averaging phi and exchanging deltas, with the sequential
  landing (``LANDING``, the defaults until the fourteenth session: the leader's frame at 4
  bits under a 1.5x window scaled to the round's distance, 2-bit Lloyd-Max offsets; ``noloco-landing-history`` with the history rule's windows, the
  eleventh session's default; ``noloco-landing-6`` at 6 bits under 8x with ternary offsets,
  the earlier default; ``-8`` at
  8, ``-4`` at 4 under a 3x window, ``-3`` at 3 under 1.5x, all three with ternary offsets;
  ``noloco-sketch-4`` / ``-3``: windows from this
  round's phi sketches, ``SKETCH_4`` / ``SKETCH_3``); ``noloco-exact-phi``:
  ``noloco-frontier`` with exact fp32 phi, the reference of the coded phi's consensus distance
  (issue 15 item 2).
- ``noloco-paper``: the spec's update with the paper's settings (``outer=noloco-spec``), no final average.
- ``local``: 4 sites that never talk. ``noloco-lattice``: 8-bit lattice phi.
- ``diloco-sched``, ``noloco-sched``: ``diloco`` and ``noloco`` with an H schedule
  (``outer.H_first``, ``H_SCHED`` below): 10 rounds of 50 steps, then every 25 steps.
- ``frontier-ternary-h10``: ``frontier-ternary`` at H = 10 whatever ``--H`` says, outer lr 0.7
  (``OFTEN``): the short budget's early gap to DDP at 5x the run's bytes of H = 50;
  ``noloco-stepped-h10``: the defaults (``noloco-stepped``) at H = 10, outer lr (beta) 0.4.

Each run is a real ``loco.local`` federation (real processes, real gRPC on loopback). Every
(row, seed) result is appended to ``<out>/results.jsonl``; the table and plots are rebuilt from
all results in that file, so rows and seeds can be run in separate invocations:

    python scripts/experiments/quality.py --rows ddp diloco --seeds 0 1 2
    python scripts/experiments/quality.py --rows frontier --seeds 0 1 2      # adds its rows
    python scripts/experiments/quality.py --report-only                      # table from the file
    python scripts/experiments/quality.py --short                            # smoke: 60 steps

Writes ``quality.md`` (table: mean and sd over seeds), ``quality.png`` (validation loss against
tokens) and ``bytes_loss.png`` (bytes per parameter per ``H`` steps against loss, every row: the
run's bytes over ``steps // H``, so a row that syncs more often is charged for it) in
``--out`` (default docs/), and prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loco.federation import run_federation  # noqa: E402
from loco.metrics import read_metrics  # noqa: E402

SITES = ["eu", "us", "asia", "sa"]
SITES8 = SITES + ["af", "oc", "me", "na"]
# NoLoCo as run in the table (the values of conf/outer/noloco.yaml, spelled out so the row does
# not move with the defaults; docs/quality.md says how they were chosen): pairwise rounds with
# DiLoCo's outer optimizer on the pair's mean delta (Nesterov, alpha 0.9, beta 0.7), the gamma
# pull on phi directly (gamma 1: each pair meets at its mean phi), and the final average
NOLOCO = [
    "outer=noloco", "outer.alpha=0.9", "outer.beta=0.7", "outer.gamma=1.0",
    "outer.consensus=weights", "outer.nesterov=true", "outer.final_average=true",
    "outer.final_lattice=false", "outer.phi_lattice=false", "outer.phi_landing=false",
]  # fmt: skip
# the frontier: sparse low-bit deltas with error feedback and the best measured coded phi
# (docs/outer.md: 8-bit lattice every round, window 8x the largest partner difference seen;
# fewer bits or phi every other round drifted apart, see docs/LOG.md)
FRONTIER = NOLOCO + [
    "compression=sparse", "outer.phi_lattice=true", "outer.phi_lattice_bits=8",
    "outer.phi_lattice_margin=8", "outer.phi_every=1",
]  # fmt: skip
# the frontier in DiLoCo's form: one bit per delta value with error feedback over the sliced
# reduce (no phi to send: every site applies the same mean), ~0.21 bytes/param/round
FRONTIER_SIGN = ["outer=diloco", "compression=sign"]
# NoLoCo's frontier, the defaults of the sixth session: ternary deltas (fp16 scales, 0.204
# B/value), the 8-bit lattice phi both ways and outer momentum 0.8 (0.9 trailed by 3-4% at 20
# rounds, 1.8% at 80)
NOLOCO_FRONTIER = NOLOCO + [
    "outer.alpha=0.8", "compression=ternary", "compression.scale_dtype=fp16",
    "outer.phi_lattice=true", "outer.phi_lattice_bits=8", "outer.phi_lattice_margin=8",
    "outer.phi_every=1",
]  # fmt: skip
# the same with the sequential landing (loco/outer/landing.py): one lattice phi per pair, the
# follower's offset back, one landing point. ``noloco-landing`` is the defaults
# (tests/test_quality_rows.py holds them equal): since 2026-12-06 (twelfth session) the
# leader's frame at 4 bits under a window of 1.5x the largest partner difference seen, that
# profile over the blocks rescaled to this round's distance from the members' phi sketches
# (``scaled``; the lattice's repairs take the few values past it) and 2-bit Lloyd-Max offsets
# (loco/outer/offset_code.py); since the thirteenth the final average in 8-bit lattice frames
# (the rows before it, and the other rows, average exact weights). ``-history``: the eleventh
# session's default, the same with the history rule's windows; ``-6``: the default of the seventh to tenth sessions, 6 bits under an
# 8x window and ternary offsets (0.49 instead of 1.02 B/value of phi; ``-8``: 8 bits, 0.61)
LANDING = ["outer.phi_landing=true", "outer.phi_landing_bits=4", "outer.phi_landing_margin=1.5",
           "outer.phi_landing_codec=normal2", "outer.phi_landing_window=scaled",
           "outer.final_lattice=true"]  # fmt: skip
# each member steps on its own delta with its own momentum and the pair lands on the mean of the
# stepped points, so no delta travels (``outer.consensus=stepped``; 2026-12-06, fourteenth
# session): ``noloco-stepped``
STEPPED = [*LANDING, "outer.consensus=stepped"]
# the same, the pairs meeting in each of the first 10 rounds, then every other round, each site
# stepping alone between, the leader's frame at 3 bits (``outer.meet_every=2``,
# ``outer.meet_first=10``; 2026-12-06, fifteenth session): ``noloco-meet2``, NoLoCo at <= 0.25
# bytes/param/round
MEET2 = [*STEPPED, "outer.meet_every=2", "outer.meet_first=10", "outer.phi_landing_bits=3"]
# meetings every other round from the start at 4 bits in blocks of 1024, the momentum rule's
# fallback frames at 6 bits, the last two meetings at 6 bits with 4-bit offsets (their misses
# are what the final average starts from; 2026-12-07, eighteenth session): ``noloco-meet2-4``,
# the exchange at <= 0.2 bytes/param/round (issue 15 item 2)
MEET2_4 = [*STEPPED, "outer.meet_every=2", "outer.phi_lattice_block=1024",
           "outer.phi_fallback_bits=6", "outer.phi_landing_last_bits=6",
           "outer.phi_landing_last_codec=normal4", "outer.phi_landing_last_meetings=2"]  # fmt: skip
LANDING_HISTORY = [*LANDING, "outer.phi_landing_window=history", "outer.final_lattice=false"]
LANDING_6 = [*LANDING_HISTORY, "outer.phi_landing_bits=6", "outer.phi_landing_margin=8",
             "outer.phi_landing_codec=ternary"]  # fmt: skip
LANDING_8 = [*LANDING_6, "outer.phi_landing_bits=8"]
# the leader's frame at 4 bits under a window 3x the largest partner difference seen (the
# 6-bit frame's window is 8x: the grid step is about the same, 2 bits fewer); 2026-12-06
LANDING_4 = [*LANDING_6, "outer.phi_landing_bits=4", "outer.phi_landing_margin=3"]
LANDING_3 = [*LANDING_6, "outer.phi_landing_bits=3", "outer.phi_landing_margin=1.5"]
# the leader's window also covers this round's followers' phi sketches (loco/outer/phi_sketch.py):
# 5x the estimated rms difference, and the history rule's window as in LANDING_4 / LANDING_3
SKETCH_4 = [*LANDING_4, "outer.phi_landing_window=sketch", "outer.phi_landing_sketch_margin=5"]
SKETCH_3 = [*LANDING_3, "outer.phi_landing_window=sketch", "outer.phi_landing_sketch_margin=5"]
# ternary deltas and one-bit slice averages (compression=ternary-sign, 0.2499 B/param/round at
# 4 sites) at the preset's outer momentum 0.8 and lr 1.3, the best measured with them at 80 rounds
FRONTIER_TERNARY = ["outer=diloco-frontier", "compression=ternary-sign"]
FRAGMENTS = ["outer.fragments=5"]
# the H schedule of the ``-sched`` rows: 10 rounds of 50 steps, then every 25 (rarely early,
# often late: docs/quality.md, "An H schedule at the short budget", says how it was chosen;
# short rounds early did not pay there)
H_SCHED = ["outer.H=25", f"outer.H_first=[{','.join(['50'] * 10)}]"]
# the frontier syncing five times as often at half its outer lr (``frontier-ternary-h10``; over
# the whole run: 5x the bytes of H = 50 at 0.25 bytes/param/round; docs/quality.md, "Syncing
# often at the short budget", 2026-12-08): at 1000 steps H = 10 with lr 0.7 beat lr 0.5 / 0.9 /
# 1.3, H = 5 (lr 0.4 / 0.7) and H = 25 (lr 1.0) on seed 0
OFTEN = ["outer.H=10", "outer.lr=0.7"]
# the same for NoLoCo's default (``noloco-stepped-h10``): H = 10 at outer lr (beta) 0.4 (0.3 and
# 0.7 worse on seed 0 at 1000 steps; 0.43 bytes/param/round, 5x a run's bytes of H = 50)
OFTEN_NOLOCO = ["outer.H=10", "outer.beta=0.4"]
DEFAULT = ["ddp", "diloco", "noloco", "noloco-landing", "frontier-ternary"]


def rows(H: int, codec: str, steps: int) -> dict[str, tuple[list[str], int]]:
    """name -> (overrides, sites)."""
    fed = f"federation.sites=[{','.join(SITES)}]"
    fed8 = f"federation.sites=[{','.join(SITES8)}]"
    h = f"outer.H={H}"
    return {
        "ddp": (
            ["federation.sites=[eu]", "site.nproc=4", "outer=local", f"outer.H={steps + 1}"],
            1,
        ),
        "diloco": ([fed, "outer=diloco", h, "compression=none"], 4),
        "diloco-8": ([fed8, "outer=diloco", h, "compression=none"], 8),
        "noloco": ([fed, *NOLOCO, h, f"compression={codec}"], 4),
        "diloco-sched": ([fed, "outer=diloco", h, *H_SCHED, "compression=none"], 4),
        "noloco-sched": ([fed, *NOLOCO, h, *H_SCHED, f"compression={codec}"], 4),
        "frontier": ([fed, *FRONTIER, h], 4),
        "noloco-frontier": ([fed, *NOLOCO_FRONTIER, h], 4),
        "noloco-frontier-8": ([fed8, *NOLOCO_FRONTIER, h], 8),
        "noloco-landing": ([fed, *NOLOCO_FRONTIER, *LANDING, h], 4),
        "noloco-stepped": ([fed, *NOLOCO_FRONTIER, *STEPPED, h], 4),
        "noloco-stepped-h10": ([fed, *NOLOCO_FRONTIER, *STEPPED, h, *OFTEN_NOLOCO], 4),
        "noloco-meet2": ([fed, *NOLOCO_FRONTIER, *MEET2, h], 4),
        "noloco-meet2-4": ([fed, *NOLOCO_FRONTIER, *MEET2_4, h], 4),
        "noloco-landing-history": ([fed, *NOLOCO_FRONTIER, *LANDING_HISTORY, h], 4),
        "noloco-landing-6": ([fed, *NOLOCO_FRONTIER, *LANDING_6, h], 4),
        "noloco-landing-8": ([fed, *NOLOCO_FRONTIER, *LANDING_8, h], 4),
        "noloco-landing-4": ([fed, *NOLOCO_FRONTIER, *LANDING_4, h], 4),
        "noloco-landing-3": ([fed, *NOLOCO_FRONTIER, *LANDING_3, h], 4),
        "noloco-sketch-4": ([fed, *NOLOCO_FRONTIER, *SKETCH_4, h], 4),
        "noloco-sketch-3": ([fed, *NOLOCO_FRONTIER, *SKETCH_3, h], 4),
        "noloco-exact-phi": ([fed, *NOLOCO_FRONTIER, "outer.phi_lattice=false", h], 4),
        "frontier-fragments": ([fed, *FRONTIER, *FRAGMENTS, h], 4),
        "frontier-8": ([fed8, *FRONTIER, h], 8),
        "frontier-sign": ([fed, *FRONTIER_SIGN, h], 4),
        "frontier-sign-8": ([fed8, *FRONTIER_SIGN, h], 8),
        "frontier-ternary": ([fed, *FRONTIER_TERNARY, h], 4),
        "frontier-ternary-8": ([fed8, *FRONTIER_TERNARY, h], 8),
        "frontier-ternary-fragments": ([fed, *FRONTIER_TERNARY, *FRAGMENTS, h], 4),
        "frontier-ternary-h10": ([fed, *FRONTIER_TERNARY, h, *OFTEN], 4),
        "frontier-sign-fragments": ([fed, *FRONTIER_SIGN, *FRAGMENTS, h], 4),
        "frontier-sign-fragments-8": ([fed8, *FRONTIER_SIGN, *FRAGMENTS, h], 8),
        "diloco-fragments": ([fed, "outer=diloco", *FRAGMENTS, h, "compression=none"], 4),
        "noloco-paper": ([fed, "outer=noloco-spec", h, f"compression={codec}"], 4),
        "local": ([fed, "outer=local", h], 4),
        "noloco-lattice": (
            [
                fed,
                *NOLOCO,
                h,
                f"compression={codec}",
                "outer.phi_lattice=true",
                "outer.phi_lattice_window=12",
            ],
            4,
        ),  # fmt: skip
        "noloco-phi-bf16": (
            [fed, *NOLOCO, h, f"compression={codec}", "compression.phi_codec=bf16"],
            4,
        ),  # fmt: skip
    }


def curve(run: Path, sites: list[str], workers_per_site: int) -> list[tuple[float, float]]:
    """(total tokens over all workers, mean val loss over sites) at each eval step."""
    per_step: dict[int, list[tuple[float, float]]] = {}
    for s in sites:
        m = run / s / "metrics.jsonl"
        if not m.exists():
            continue
        for r in read_metrics(m, "eval"):
            per_step.setdefault(r["step"], []).append((r["tokens"], r["loss"]))
    out = []
    for step in sorted(per_step):
        vals = per_step[step]
        if len(vals) == len(sites):
            tokens = sum(t for t, _ in vals)
            out.append((tokens, sum(v for _, v in vals) / len(vals)))
    return out


def round_distance(run: Path, sites: list[str]) -> float | None:
    """The mean consensus distance of the pairwise rounds of the run's second half, as each
    site measured it before its round (with the landing: a follower to its leader's decoded
    phi; the leader measures none), over every site's records: the distance the rounds keep,
    where the final snapshot (``consensus_distance``) is one sample of it."""
    vals: list[float] = []
    for s in sites:
        m = run / s / "metrics.jsonl"
        if not m.exists():
            continue
        recs = [r for r in read_metrics(m, "outer")
                if r.get("consensus_distance") and "," not in str(r.get("partner", ""))]  # fmt: skip
        last = max((r["round"] for r in recs), default=0)
        vals += [r["consensus_distance"] for r in recs if r["round"] > last // 2]
    return _mean(vals)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def ddp_on_one_gpu(ov: list[str], batch: int) -> tuple[list[str], int]:
    """The ``ddp`` row where its 4 ranks would share one GPU (one NCCL rank per GPU): one rank
    with the 4 workers' batch, the same mean gradient over the same number of tokens a step."""
    nproc = [o for o in ov if o.startswith("site.nproc=")]
    workers = int(nproc[0].split("=", 1)[1]) if nproc else 1
    return [o for o in ov if o not in nproc] + ["site.nproc=1"], batch * workers


def run_one(name: str, seed: int, a: argparse.Namespace, stamp: str) -> dict:
    """Run row ``name`` at ``seed``; its result record (also appended to results.jsonl)."""
    ov, nsites = rows(a.H, a.codec, a.steps)[name]
    batch = a.batch
    if name == "ddp" and a.device == "cuda":
        ov, batch = ddp_on_one_gpu(ov, a.batch)
    evals = max(a.H // 2, a.steps // 12)
    common = [
        f"model={a.model}", f"train.steps={a.steps}", f"train.batch_size={batch}",
        f"train.seq_len={a.seq_len}", f"train.eval_every={evals}", "train.eval_batches=8",
        f"train.log_every={max(1, evals // 2)}", "gossip.insecure=true",
        f"data.num_shards={max(4, nsites)}", f"train.warmup_steps={max(1, a.steps // 20)}",
        f"train.seed={seed}", f"site.device={a.device}",
    ]  # fmt: skip
    run = a.runs / stamp / f"{name}-s{seed}"
    t0 = time.monotonic()
    out = run_federation(ov + common + (a.set if name != "ddp" else []), run, timeout=a.timeout)
    wall = time.monotonic() - t0
    site_rows = out["sites"]
    sites = [r["site"] for r in site_rows]
    vals = [r["val_loss"] for r in site_rows if r.get("val_loss") is not None]
    params = next((r.get("params") for r in site_rows if r.get("params")), 0)
    workers = 4 if name == "ddp" else nsites
    # the rounds run (an H schedule runs more than steps // H); DDP: one "round" per H steps
    ran = [r["rounds"] for r in site_rows if r.get("rounds")]
    rounds = max(ran) if ran and name != "ddp" else max(1, a.steps // a.H)
    if name == "ddp":  # ring all-reduce every step: 2 x 4 bytes per parameter per worker
        sent = workers * 8.0 * params * a.steps
    else:
        sent = float(sum(r.get("bytes_sent") or 0 for r in site_rows))
    dist = [r["final_distance"] for r in site_rows if r.get("final_distance") is not None]
    util = [r["compute_utilization"] for r in site_rows if r.get("compute_utilization") is not None]
    before = [r["final_average_distance"] for r in site_rows if r.get("final_average_distance")]
    rec = {
        "row": name, "seed": seed, "steps": a.steps, "H": a.H, "model": a.model, "overrides": ov,
        "device": a.device,
        "ok": all(r.get("exit") == 0 for r in site_rows), "val_loss": _mean(vals),
        "bytes_sent": sent, "params": params, "workers": workers, "rounds": rounds,
        # what one site (one worker for DDP) sends per parameter per round of H steps
        "bytes_per_param_round": sent / workers / max(params, 1) / rounds,
        "bytes_per_param": sent / workers / max(params, 1),  # over the whole run
        "consensus_distance": _mean(before) if before else _mean(dist),
        "round_distance": round_distance(run, sites) if name != "ddp" else None,
        "compute_utilization": _mean(util) if name != "ddp" else None,
        "wall_s": wall, "run": str(run), "set": a.set if name != "ddp" else [],
        "curve": curve(run, sites, 4 if name == "ddp" else 1),
    }  # fmt: skip
    with open(a.out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="a quick smoke run (60 steps, H = 20)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--H", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--model", default="tiny")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="site.device of every run; on cuda the ddp row is one rank with the 4 workers' batch",
    )
    ap.add_argument("--codec", default="int8", help="the delta codec of the noloco rows")
    ap.add_argument(
        "--rows",
        "--only",
        nargs="*",
        default=None,
        help=f"rows: {' '.join(rows(50, 'int8', 1))} (default: {' '.join(DEFAULT)})",
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "outputs" / "quality")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where the table goes")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="extra Hydra overrides for the federated rows (not DDP)",
    )
    ap.add_argument("--report-only", action="store_true", help="rebuild the table only")
    ap.add_argument(
        "--records",
        nargs="*",
        type=Path,
        default=None,
        help="result files the table is built from (default: OUT/results.jsonl)",
    )
    a = ap.parse_args()
    if a.short:
        a.steps, a.H = 60, 20
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in a.rows or DEFAULT:
            for seed in a.seeds:
                run_one(name, seed, a, stamp)
    write_report(a)


def _stats(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(records: list[dict]) -> dict[str, dict]:
    """Per row (and budget; its ``--set`` overrides and a record's ``variant``, a name for what
    the row's defaults were at that commit): mean and sd of the loss over seeds, mean of the
    other figures."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("ok") and r.get("val_loss") is not None:
            key = f"{r['row']}{' ' + ' '.join(r['set']) if r.get('set') else ''}"
            if r.get("variant"):  # what the row stood for at the record's commit
                key += f" [{r['variant']}]"
            groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        m, sd = _stats([r["val_loss"] for r in rs])
        cds = [r["consensus_distance"] for r in rs if r.get("consensus_distance") is not None]
        uts = [r["compute_utilization"] for r in rs if r.get("compute_utilization") is not None]
        out[key] = {
            "row": rs[0]["row"], "loss": m, "sd": sd, "seeds": sorted(r["seed"] for r in rs),
            "bpr": _mean([r["bytes_per_param_round"] for r in rs]),
            "bpp": _mean([r.get("bytes_per_param", r["bytes_per_param_round"] * r["rounds"])
                          for r in rs]),
            "rounds": _mean([r["rounds"] for r in rs]),
            "cd": _mean(cds), "util": _mean(uts),
            "curve": next((r["curve"] for r in rs if r.get("curve")), None),
        }  # fmt: skip
    return out


def _vs(x: dict, ref: dict | None) -> str:
    if ref is None:
        return "-"
    if ref is x:
        return "+0.0%"
    d = (x["loss"] / ref["loss"] - 1) * 100
    tie = " (tie)" if abs(x["loss"] - ref["loss"]) < max(x["sd"], ref["sd"]) else ""
    return f"{d:+.1f}%{tie}"


def write_report(a: argparse.Namespace) -> None:
    paths = a.records if a.records else [a.out / "results.jsonl"]
    records = [
        json.loads(x) for p in paths if p.exists() for x in p.read_text().splitlines() if x.strip()
    ]
    records = [
        r
        for r in records
        if r.get("steps") == a.steps
        and r.get("model") == a.model
        and r.get("device", "cpu") == a.device
        and r.get("bytes_representative", True)  # false: a run whose bytes are not the code's
    ]
    agg = aggregate(records)
    ddp, dil = agg.get("ddp"), agg.get("diloco")
    sources = ", ".join(f"`{p.name}`" for p in paths)
    lines = [
        f"# Quality at {a.steps} steps, H = {a.H} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python scripts/experiments/quality.py --steps {a.steps} --H {a.H} ...` (results "
        f"from {sources}): model {a.model}, 4 workers x {a.batch} x {a.seq_len} "
        f"tokens x {a.steps} steps; machine: {platform.machine()}, {_cores()} CPU cores, shared"
        f"{', site.device=cuda (the ddp row: one rank, 4x the batch)' if a.device == 'cuda' else ''}.",
        "",
        "| row | val loss (mean ± sd) | seeds | vs DDP | vs DiLoCo | rounds | bytes/param/round | "
        "bytes/param (run) | DDP / bytes | consensus distance | utilization |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, x in agg.items():
        ratio = f"{ddp['bpp'] / x['bpp']:.0f}x" if ddp and x["bpp"] else "-"
        cd = f"{x['cd']:.2e}" if x["cd"] is not None else "-"
        ut = f"{x['util']:.2f}" if x["util"] is not None else "-"
        lines.append(
            f"| {key} | {x['loss']:.4f} ± {x['sd']:.4f} | {','.join(map(str, x['seeds']))} "
            f"| {_vs(x, ddp)} | {_vs(x, dil)} | {x['rounds']:.0f} | {x['bpr']:.3f} | "
            f"{x['bpp']:.1f} | {ratio} | {cd} | {ut} |"
        )
    lines += [
        "",
        "bytes/param/round: what one site sends (delta + phi, and the final average spread over "
        "the rounds) per parameter per round run (an H schedule runs more, shorter rounds); "
        "bytes/param (run): the same over the whole run, which DDP / bytes compares; DDP: one "
        "worker's ring all-reduce traffic over H steps (2 x 4 bytes per parameter per step). "
        "A difference smaller than "
        "the larger sd of the two rows is a tie. Consensus distance: RMS distance between the "
        "sites right before NoLoCo's final average (else of the final parameters from their "
        "mean). Utilization: inner compute time over wall time (loopback).",
        "",
        "![validation loss against tokens](quality.png) ![bytes against loss](bytes_loss.png)",
        "",
    ]
    (a.out / "quality.md").write_text("\n".join(lines))
    _plots(agg, a)
    print(f"wrote {a.out / 'quality.md'}", flush=True)


def _plots(agg: dict[str, dict], a: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, x in agg.items():
        if x["curve"]:
            xs, ys = zip(*x["curve"], strict=True)
            ax.plot(xs, ys, marker=".", label=key)
    ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("validation loss (mean over sites)")
    ax.set_title(
        f"{a.model}, H = {a.H}, seed {min(min(x['seeds']) for x in agg.values()) if agg else 0}"
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # records without run directories draw no curve
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "quality.png", dpi=110)
    nominal = max(1, a.steps // a.H)
    for x in agg.values():
        x["x_bytes"] = per_nominal_round(x, a.steps, a.H)
    fig, ax = (_bytes_loss_many if len(agg) > MANY else _bytes_loss_each)(agg, plt)
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes per parameter per {a.H} steps: the run's over {nominal} (one site; "
                  f"per round at H = {a.H})")  # fmt: skip
    ax.set_ylabel("final validation loss (mean over seeds)")
    ax.set_title(f"{a.model}, {a.steps} steps, H = {a.H}")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(a.out / "bytes_loss.png", dpi=110, bbox_inches="tight")


def per_nominal_round(x: dict, steps: int, H: int) -> float | None:
    """The plots' bytes: a configuration's bytes per parameter over the run (one site) divided
    by the budget's ``steps // H`` rounds; per round for a row at ``H``, more for a row that
    syncs more often over the same budget (a smaller H, an H schedule)."""
    return x["bpr"] * x["rounds"] / max(1, steps // H) if x["bpr"] else None


MANY = 24  # above this many configurations the plot colours families and names the front


def _bytes_loss_each(agg: dict[str, dict], plt) -> tuple:
    """One marker and legend line per configuration."""
    fig, ax = plt.subplots(figsize=(10.0, max(4.6, 0.14 * len(agg) + 0.8)))
    for i, (key, x) in enumerate(agg.items()):
        if x["x_bytes"]:
            ax.errorbar([x["x_bytes"]], [x["loss"]], yerr=[x["sd"]], fmt="osD^v<>"[i // 10 % 7],
                        capsize=3, label=key)  # fmt: skip
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig, ax


def family(row: str) -> str:
    """The kind of method a row is, for the colours of the plot of many configurations."""
    for prefix, name in (("ddp", "DDP"), ("diloco", "DiLoCo fp32"), ("noloco", "NoLoCo"),
                         ("frontier", "frontier (DiLoCo form)")):  # fmt: skip
        if row.startswith(prefix):
            return name
    return "other"


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points ``(bytes, loss, key)`` that no other point beats on both (fewer or as many
    bytes and a lower loss), by bytes."""
    front, best = [], math.inf
    for b, loss, key in sorted(points):
        if loss < best:
            front.append((b, loss, key))
            best = loss
    return front


def _bytes_loss_many(agg: dict[str, dict], plt) -> tuple:
    """Every configuration as a point coloured by its family; the lower-left front (no other
    point has fewer bytes and a lower loss) named beside its points. Outliers far above the
    rest are named in a corner, not drawn."""
    fig, ax = plt.subplots(figsize=(11.0, 7.0))
    pts = [(x["x_bytes"], x["loss"], k) for k, x in agg.items() if x["x_bytes"]]
    losses = sorted(p[1] for p in pts)
    top = losses[int(0.9 * (len(losses) - 1))] + 0.1
    out = [f"{k} {loss:.2f}" for _, loss, k in pts if loss > top]
    colours: dict[str, str] = {}
    for b, loss, k in pts:
        fam = family(agg[k]["row"])
        new = fam not in colours
        c = colours.setdefault(fam, f"C{len(colours)}")
        ax.errorbar([b], [loss], yerr=[agg[k]["sd"]], fmt="o", color=c, alpha=0.55, capsize=2,
                    markersize=4, label=fam if new else None)  # fmt: skip
    front = pareto([p for p in pts if p[1] <= top])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=0.8, ls="--")
    for b, loss, k in front:
        n = len(agg[k]["seeds"])
        name = (k if len(k) <= 60 else k[:57] + "...") + f" ({n} seed{'s' if n > 1 else ''})"
        ax.annotate(name, (b, loss), fontsize=6, xytext=(4, -8), textcoords="offset points")
    if out:
        ax.set_ylim(top=top)
        ax.text(0.99, 0.99, "above, not shown:\n" + "\n".join(out), transform=ax.transAxes,
                fontsize=6, va="top", ha="right")  # fmt: skip
    ax.legend(fontsize=8, loc="lower left", title="family (dashed: the front, named)")
    return fig, ax


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
