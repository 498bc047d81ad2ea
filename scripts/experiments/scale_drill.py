"""N real sites on one machine with kills: some killed mid-run, some restarted from their
checkpoints, one replaced by a joiner; every survivor must finish with finite values.

    python scripts/experiments/scale_drill.py --sites 32 --kill 4 --restart 2 --replace 1

Prints one JSON line: wall time, exit codes, paired rounds, payload and membership bytes per
site, the consensus distance before the kills and at the end. Exit status 1 when a survivor
failed or a non-finite value was applied. ``tests/drills/test_scale.py`` (slow) runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loco.federation import Federation
from loco.metrics import read_metrics

TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=2",
        "train.seq_len=64", "train.eval_every=1000", "train.eval_batches=2", "train.log_every=5",
        "train.warmup_steps=2", "train.lr=3e-3", "train.threads=1", "train.tensorboard=false"]  # fmt: skip
# failures found within ~1 s; a partner that died is given up after pull_timeout_s
FAILURE = ["gossip.heartbeat_s=0.5", "gossip.dead_after=2", "gossip.hello_timeout_s=2.0",
           "gossip.max_retries=2", "gossip.backoff_s=0.05", "gossip.pull_timeout_s=15",
           "outer.join_timeout_s=120"]  # fmt: skip


def _last_step(d: Path) -> int:
    recs = read_metrics(d / "metrics.jsonl", "train") if (d / "metrics.jsonl").exists() else []
    return recs[-1]["step"] if recs else 0


def _wait(what: str, cond, fed: Federation, timeout: float) -> None:
    t0 = time.monotonic()
    while not cond():
        bad = {n: c for n, c in fed.poll().items() if c not in (None, 0, -9)}
        if bad:
            raise RuntimeError(f"waiting for {what}: site(s) exited {bad}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.2)


def _site_figures(d: Path) -> dict[str, Any]:
    """One site's figures from its metrics and summary."""
    outer = read_metrics(d / "metrics.jsonl", "outer")
    losses = [r["loss"] for k in ("train", "eval") for r in read_metrics(d / "metrics.jsonl", k)]
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    paired = [r for r in outer if r["n"] > 1]
    return {
        "paired_rounds": len(paired),
        "rounds": len(outer),
        "payload_bytes_sent": summary.get("bytes_sent"),
        # Hello (heartbeats or on-demand) + SWIM datagrams sent + Swim.Key calls
        "membership_bytes": sum(summary.get(k) or 0.0 for k in ("hello_bytes", "swim_bytes")),
        "swim_bytes": summary.get("swim_bytes"),
        "finite": all(x is not None and math.isfinite(x) for x in losses) and bool(losses),
        "distances": {r["round"]: r["consensus_distance"] for r in paired},
        "val_loss": summary.get("val_loss"),
        "last_step": _last_step(d),
    }


def run(out: Path, sites: int, kill: int, restart: int, replace: int, steps: int, H: int,
        timeout: float = 900.0, extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the drill in ``out`` (``extra``: more overrides for every site, e.g.
    ``gossip.membership=swim``); returns the result (also printed as one JSON line)."""
    assert restart + replace <= kill <= sites - 2
    names = [f"s{i:02d}" for i in range(sites)]
    ov = [f"federation.sites=[{','.join(names)}]", *TINY, *FAILURE, f"train.steps={steps}",
          f"outer.H={H}", f"checkpoint.every={H}", "gossip.odd=sit_out", *(extra or [])]  # fmt: skip
    fed = Federation(out, names, ov, nproc=1, insecure=False, method="noloco")
    victims = names[1 : 1 + kill]  # s00 stays: it is the joiner's seed among others
    restarted, replaced = victims[:restart], victims[restart : restart + replace]
    kill_at = steps // 4
    t0 = time.monotonic()
    fed.start()
    try:
        _wait("the victims past their kill step",
              lambda: all(_last_step(out / v) >= kill_at for v in victims), fed, timeout)  # fmt: skip
        for v in victims:
            fed.kill(v)
        killed_at = {v: _last_step(out / v) for v in victims}
        alive = [n for n in names if n not in victims]
        mark = {n: _last_step(out / n) for n in alive}
        _wait("the others to run a round without them",
              lambda: all(_last_step(out / n) >= min(mark[n] + H, steps) for n in alive), fed,
              timeout)  # fmt: skip
        for v in restarted:
            fed.restart(v, ["resume=latest"])
        for v in replaced:
            fed.restart(v, run_dir=out / f"{v}-joiner")
        codes = fed.wait(status_every=0, timeout=timeout)
    finally:
        fed.stop(grace=5)
    wall = time.monotonic() - t0
    dirs = {n: out / n for n in names} | {v: out / f"{v}-joiner" for v in replaced}
    figs = {n: _site_figures(d) for n, d in dirs.items() if (d / "metrics.jsonl").exists()}
    survivors = [n for n in names if n not in victims or n in restarted or n in replaced]
    by_round: dict[int, float] = {}  # the largest distance any survivor recorded per round
    for n, f in figs.items():
        for t, x in f["distances"].items():
            if n in survivors and x is not None:
                by_round[t] = max(by_round.get(t, 0.0), x)
    # each survivor's last measured distance (a landing's leader measures none in its round)
    measured = [[x for _, x in sorted(f["distances"].items()) if x is not None]
                for n, f in figs.items() if n in survivors]  # fmt: skip
    last = [xs[-1] for xs in measured if xs]
    result = {
        "sites": sites, "overrides": list(extra or []), "killed": victims, "restarted": restarted, "replaced": replaced,
        "killed_at": killed_at, "wall_s": round(wall, 1),
        "exit": {n: codes.get(n) for n in names},
        "survivors_ok": all(codes.get(n) == 0 for n in survivors),
        "all_finite": all(f["finite"] for n, f in figs.items() if n in survivors),
        "paired_rounds": {n: f["paired_rounds"] for n, f in figs.items()},
        "last_step": {n: f["last_step"] for n, f in figs.items()},
        "payload_bytes_per_site_mean": statistics.mean(
            f["payload_bytes_sent"] or 0.0 for n, f in figs.items() if n in survivors),
        "membership_bytes_per_site_mean": statistics.mean(
            f["membership_bytes"] for n, f in figs.items() if n in survivors),
        "swim_bytes_per_site_mean": statistics.mean(
            f["swim_bytes"] or 0.0 for n, f in figs.items() if n in survivors),
        "distance_max_by_round": dict(sorted(by_round.items())),
        "distance_last_max": max(last, default=None),
        "distance_last_median": statistics.median(last) if last else None,
        "val_loss_mean": statistics.mean(f["val_loss"] for n, f in figs.items()
                                         if n in survivors and f["val_loss"] is not None),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scale_drill.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/scale-drill"))
    ap.add_argument("--sites", type=int, default=32)
    ap.add_argument("--kill", type=int, default=4)
    ap.add_argument("--restart", type=int, default=2)
    ap.add_argument("--replace", type=int, default=1)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--H", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every site (repeatable), e.g. gossip.membership=swim")  # fmt: skip
    a = ap.parse_args(argv)
    r = run(a.out, a.sites, a.kill, a.restart, a.replace, a.steps, a.H, a.timeout, a.set)
    return 0 if r["survivors_ok"] and r["all_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
