"""The figures of docs/sim.md: ``python -m loco.sim.figures [out_dir] [rounds]``.

Runs the simulator at N = 4, 16, 64, 256, 1024, without failures and with churn (4% of the
sites killed at round 10, half of them back 5 rounds later, 1% of membership messages dropped),
prints one JSON line per run (the per-round series left out) and draws three figures:
``sim-consensus.png`` (consensus distance over rounds), ``sim-round-time.png`` (a round under
NoLoCo vs ring and tree all-reduce DiLoCo on the same links) and ``sim-bytes.png`` (bytes per
site per round).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import SimOptions
from .run import simulate

SIZES = (4, 16, 64, 256, 1024)


def runs(rounds: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"clean": [], "churn": []}
    for n in SIZES:
        for case in out:
            kw = {}
            if case == "churn":
                kill = max(1, round(0.04 * n)) if n > 4 else 1
                kw = {"kill": kill, "kill_round": 10, "restart": kill // 2, "drop": 0.01}
            rec = simulate(SimOptions(sites=n, rounds=rounds, **kw))
            out[case].append(rec)
            brief = {k: v for k, v in rec.items() if k not in ("consensus", "objective")}
            brief["consensus_last"] = rec["consensus"][-1]
            brief["consensus_max"] = max(rec["consensus"])
            brief["case"] = case
            print(json.dumps(brief), flush=True)
    return out


def draw(res: dict[str, list[dict]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in res["clean"]:
        ax.plot(rec["consensus"], label=f"N={rec['sites']}")
    for rec in res["churn"]:
        ax.plot(rec["consensus"], ls="--", lw=0.8, color="gray")
    ax.set(xlabel="round", ylabel="consensus distance (RMS of phi - mean phi)",
           title="NoLoCo consensus distance (dashed: churn)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sim-consensus.png", dpi=110)

    n = [r["sites"] for r in res["clean"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("round_s", "NoLoCo round"), ("sync_s", "NoLoCo sync (pull)"),
                       ("diloco_ring_round_s", "DiLoCo round, ring all-reduce"),
                       ("diloco_tree_round_s", "DiLoCo round, tree all-reduce"),
                       ("tree_allreduce_s", "tree all-reduce alone")):  # fmt: skip
        ax.plot(n, [r[key] for r in res["clean"]], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sites N", ylabel="seconds",
           title="Time of a round (100M fp32 parameters, 10 s compute)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sim-round-time.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("payload", "NoLoCo payload (pulls)"), ("membership", "SWIM membership"),
                       ("proposals", "pairing proposals"),
                       ("ring_allreduce", "ring all-reduce")):  # fmt: skip
        ax.plot(n, [r["bytes_per_site_round"][key] for r in res["clean"]], marker="o",
                label=label)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="sites N", ylabel="bytes per site per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sim-bytes.png", dpi=110)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else Path("docs")
    rounds = int(argv[1]) if len(argv) > 1 else 30
    draw(runs(rounds), out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
