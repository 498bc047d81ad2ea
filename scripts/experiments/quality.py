"""Quality at a fixed token budget: DDP-equivalent vs DiLoCo vs NoLoCo vs local-only, 4 sites.

Every method sees the same tokens: 4 workers x ``batch`` sequences x ``steps`` steps.

- ``ddp``: ONE site with 4 ranks (``site.nproc=4``, ZeRO stage 0: gradients all-reduced every
  step; ``outer.H`` past the last step, so no outer round), the exact data-parallel baseline;
  its bytes are what a ring all-reduce moves (2 x 4 bytes per parameter per step per worker).
- ``diloco``: 4 sites, all in one group every H steps (outer Nesterov SGD, lr 0.7, momentum 0.9).
- ``noloco``: 4 sites, random pairs every H steps (n = 2), int8 deltas, exact phi; ``NOLOCO``
  below: DiLoCo's outer optimizer on the pair's mean delta, the gamma pull on phi directly,
  and the final average over the sites after the last step.
- ``noloco-paper`` (``--only``): the spec's update with the paper's settings, no final average.
- ``local``: 4 sites that never talk.
- ``noloco-lattice``: ``noloco`` with phi sent modulo-quantized (``outer.phi_lattice=true``).

Each run is a real ``loco.local`` federation (real processes, real gRPC on loopback). Writes
``docs/quality.md`` (table) and ``docs/quality.png`` (validation loss against tokens) unless
``--out`` says otherwise, and prints one JSON line per method.

    python scripts/experiments/quality.py                  # full: tiny, 4000 steps, H = 50 (~50 min)
    python scripts/experiments/quality.py --short          # smoke: 60 steps, H = 20

The same comparison as a Hydra sweep (one table at the end, without the DDP run):
``python -m loco.local -m outer=noloco,diloco,local federation.sites=[eu,us,asia,sa] ...``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loco.federation import run_federation  # noqa: E402
from loco.metrics import read_metrics  # noqa: E402

SITES = ["eu", "us", "asia", "sa"]
# NoLoCo as run in the table (docs/quality.md says how these were chosen): pairwise rounds with
# DiLoCo's outer optimizer on the pair's mean delta (Nesterov, alpha 0.9, beta 0.7), the gamma
# pull on phi directly (gamma 1: each pair meets at its mean phi), and the final average
NOLOCO = [
    "outer=noloco", "outer.alpha=0.9", "outer.beta=0.7", "outer.gamma=1.0",
    "outer.consensus=weights", "outer.nesterov=true", "outer.final_average=true",
]  # fmt: skip
DEFAULT = ["ddp", "diloco", "noloco", "local", "noloco-lattice"]


def methods(H: int, codec: str, steps: int) -> dict[str, list[str]]:
    fed = f"federation.sites=[{','.join(SITES)}]"
    return {
        "ddp": ["federation.sites=[eu]", "site.nproc=4", "outer=local", f"outer.H={steps + 1}"],
        "diloco": [fed, "outer=diloco", f"outer.H={H}", "compression=none"],
        "noloco": [fed, *NOLOCO, f"outer.H={H}", f"compression={codec}"],
        # the spec's update with the paper's settings (conf/outer/noloco.yaml), no final average
        "noloco-paper": [fed, "outer=noloco", f"outer.H={H}", f"compression={codec}"],
        "local": [fed, "outer=local", f"outer.H={H}"],
        # NoLoCo with phi modulo-quantized next to the receiver's phi: ~2.1 bytes/param/round;
        # grid max|m| / 12 per block (the default 8 is coarser: +5.2% vs DDP at 80 rounds)
        "noloco-lattice": [
            fed,
            *NOLOCO,
            f"outer.H={H}",
            f"compression={codec}",
            "outer.phi_lattice=true",
            "outer.phi_lattice_window=12",
        ],
        # optional (--only ... noloco-phi-bf16): phi in bf16, 3.03 instead of 5.02 bytes/param
        "noloco-phi-bf16": [
            fed,
            *NOLOCO,
            f"outer.H={H}",
            f"compression={codec}",
            "compression.phi_codec=bf16",
        ],  # fmt: skip
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="a quick smoke run (60 steps, H = 20)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--H", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--codec", default="int8")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="methods: ddp diloco noloco noloco-paper local noloco-lattice noloco-phi-bf16 "
        f"(default: {' '.join(DEFAULT)})",
    )
    ap.add_argument("--runs", type=Path, default=ROOT / "outputs" / "quality")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where quality.md/.png go")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="extra Hydra overrides for the federated methods (not DDP), e.g. outer.beta=1.0",
    )
    a = ap.parse_args()
    if a.short:
        a.steps, a.H = 60, 20
    evals = max(a.H // 2, a.steps // 12)
    common = [
        f"model={a.model}", f"train.steps={a.steps}", f"train.batch_size={a.batch}",
        f"train.seq_len={a.seq_len}", f"train.eval_every={evals}", "train.eval_batches=8",
        f"train.log_every={max(1, evals // 2)}", "gossip.insecure=true", "data.num_shards=4",
        "train.warmup_steps=" + str(max(1, a.steps // 20)),
    ]  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for name, ov in methods(a.H, a.codec, a.steps).items():
        if name not in (a.only or DEFAULT):
            continue
        run = a.runs / stamp / name
        t0 = time.monotonic()
        extra = a.set if name != "ddp" else []
        out = run_federation(ov + common + extra, run, timeout=a.timeout)
        wall = time.monotonic() - t0
        rows = out["sites"]
        sites = [r["site"] for r in rows]
        ok = all(r.get("exit") == 0 for r in rows)
        vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        params = next((r.get("params") for r in rows if r.get("params")), 0)
        if name == "ddp":  # 4 workers, ring all-reduce every step
            sent = 4 * 8.0 * params * a.steps
        elif name == "local":
            sent = 0.0
        else:
            sent = sum(r.get("bytes_sent") or 0 for r in rows)
        dist = [r["final_distance"] for r in rows if r.get("final_distance") is not None]
        util = [r["compute_utilization"] for r in rows if r.get("compute_utilization") is not None]
        # NoLoCo with the final average: how far apart the sites were right before it
        before = [r["final_average_distance"] for r in rows if r.get("final_average_distance")]
        results[name] = {
            "method": name, "ok": ok, "val_loss": sum(vals) / len(vals) if vals else None,
            "val_loss_sites": vals, "bytes_sent": sent, "wall_s": wall,
            "consensus_distance": sum(dist) / len(dist) if dist else None,
            "distance_before_average": sum(before) / len(before) if before else None,
            "compute_utilization": sum(util) / len(util) if util and name != "ddp" else None,
            "curve": curve(run, sites, 4 if name == "ddp" else 1), "run": str(run),
            "tokens": a.steps * a.batch * a.seq_len * 4,
        }  # fmt: skip
        print(json.dumps({k: v for k, v in results[name].items() if k != "curve"}), flush=True)
    write_report(results, a)


def write_report(results: dict, a: argparse.Namespace) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    ddp = results.get("ddp", {}).get("val_loss")
    dil = results.get("diloco", {}).get("val_loss")
    lines = [
        f"# Quality at a fixed token budget ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python scripts/experiments/quality.py{''.join(' ' + x for x in sys.argv[1:])}`: "
        f"model {a.model}, "
        f"4 workers x {a.batch} x {a.seq_len} tokens x {a.steps} steps "
        f"({a.steps * a.batch * a.seq_len * 4:,} tokens per method), H = {a.H}, NoLoCo delta codec "
        f"{a.codec} (phi exact); machine: {platform.machine()}, {_cores()} CPU cores, shared.",
        "",
        "| method | final val loss | vs DDP | vs DiLoCo | bytes on the wire | DDP / bytes | "
        "consensus distance | utilization | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        v = r["val_loss"]

        def rel(ref: float | None, v: float | None = v) -> str:
            return f"{(v / ref - 1) * 100:+.1f}%" if v and ref else "-"

        ddp_bytes = results.get("ddp", {}).get("bytes_sent")
        ratio = f"{ddp_bytes / r['bytes_sent']:.0f}x" if ddp_bytes and r["bytes_sent"] else "-"
        cd = f"{r['consensus_distance']:.2e}" if r["consensus_distance"] is not None else "-"
        if r.get("distance_before_average") is not None:
            cd += f" ({r['distance_before_average']:.2e} before the final average)"
        ut = r.get("compute_utilization")
        ut = f"{ut:.2f}" if ut is not None else "-"
        lines.append(
            f"| {name}{'' if r['ok'] else ' (a site failed)'} | {v:.4f} | {rel(ddp)} | {rel(dil)} "
            f"| {r['bytes_sent'] / 1e6:.1f} MB | {ratio} | {cd} | {ut} | {r['wall_s']:.0f} s |"
            if v is not None
            else f"| {name} | failed | | | | | | | |"
        )
    lines += [
        "",
        "Bytes: what the sites' gossip servers sent (delta + phi, all sites); DDP: 2 x 4 bytes "
        "per parameter per step per worker (ring all-reduce). Consensus distance: RMS distance "
        "of each site's final parameters from the sites' mean (0 after NoLoCo's final average; "
        "in brackets the RMS distance between sites right before it). Loss: mean over the "
        "sites. Utilization: inner compute time over wall time, mean over rounds (loopback).",
        "",
        "![validation loss against tokens](quality.png)",
        "",
    ]
    (a.out / "quality.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, r in results.items():
            if r["curve"]:
                xs, ys = zip(*r["curve"], strict=True)
                ax.plot(xs, ys, marker=".", label=name)
        ax.set_xlabel("tokens (all workers)")
        ax.set_ylabel("validation loss (mean over sites)")
        ax.set_title(f"{a.model}, 4 workers, H = {a.H}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / "quality.png", dpi=110)
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
    print(f"wrote {a.out / 'quality.md'} and {a.out / 'quality.png'}", flush=True)


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
