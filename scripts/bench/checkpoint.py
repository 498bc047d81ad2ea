"""Benchmark of the asynchronous checkpoint writer against ``torch.save`` and ``dd``.

Prints ONE JSON line. The state is one rank's checkpoint: five fp32 range streams of
``--numel`` values (master weights, two AdamW moments, outer phi and momentum), plus the RNG
state. Each round runs, alternately and in the same directory:

* ours: ``CheckpointWriter.save`` (the training stall: wait for the previous write, snapshot
  into the staging buffer) and then its background write (raw bytes, CRC-32 per entry, fsync,
  manifest, rename, ``latest``);
* ``torch.save`` of the same tensors to one file (its whole time is a stall; no fsync, as
  usually called);
* ``dd if=/dev/zero bs=16M conv=fsync`` of the same byte count (the disk's sequential rate).

Ratios are per round and the figures are medians over ``--rounds``:
``stall_vs_torch_save`` = our stall / torch.save time (goal <= 0.10);
``write_vs_dd`` = our write throughput (rank file bytes / write+checksum+fsync time) / dd's
(goal >= 0.80). With ``--device cuda`` the tensors live on the GPU and the snapshot goes to
pinned host memory.

    python scripts/bench/checkpoint.py                    # 16M values: 320 MB per save
    python scripts/bench/checkpoint.py --numel 4194304 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from loco.checkpoint import CheckpointWriter


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dd(path: Path, nbytes: int) -> float:
    count = -(-nbytes // (16 << 20))
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    dt = time.perf_counter() - t0
    path.unlink()
    return count * (16 << 20) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=16 << 20, help="values per stream")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in .)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    names = ["master", "optim.exp_avg", "optim.exp_avg_sq", "outer.phi", "outer.momentum"]
    tensors = {k: torch.randn(args.numel, generator=g).to(dev) for k in names}
    tensors["rng.torch"] = torch.get_rng_state()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or "."))
    meta = {"layout": {"hash": "bench", "numel": args.numel, "params": []}}
    writer = CheckpointWriter(base / "ours", keep=1, meta=meta)
    rows = []
    try:
        for r in range(args.rounds + 1):  # round 0 warms the staging buffer and the cache
            for k in names:  # training touches the state between saves
                tensors[k].mul_(1.0)
            writer.save(r, tensors, range=(0, args.numel), manifest={"streams": names[:5]})
            stall = writer.stall_seconds
            t0 = time.perf_counter()
            writer.wait()
            commit_tail = time.perf_counter() - t0
            write_s = writer.write_seconds
            t0 = time.perf_counter()
            torch.save(tensors, base / "torch.pt")
            ts = time.perf_counter() - t0
            (base / "torch.pt").unlink()
            dd = _dd(base / "dd.bin", nbytes)
            if r == 0:
                continue
            rows.append(dict(stall=stall, torch_save=ts, write_s=write_s, dd=dd,
                             commit_tail=commit_tail))  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(x[k] for x in rows)

    ours_gbps = [nbytes / x["write_s"] / 1e9 for x in rows]
    out = {
        "bench": "checkpoint",
        "machine": f"{_cpu_name()}; {os.cpu_count()} cpus; torch {torch.__version__}",
        "device": str(dev),
        "bytes": nbytes,
        "rounds": len(rows),
        "stall_s": med("stall"),
        "torch_save_s": med("torch_save"),
        "stall_vs_torch_save": statistics.median(x["stall"] / x["torch_save"] for x in rows),
        "write_s": med("write_s"),
        "write_GBps": statistics.median(ours_gbps),
        "dd_GBps": med("dd") / 1e9,
        "write_vs_dd": statistics.median(nbytes / x["write_s"] / x["dd"] for x in rows),
        "commit_after_write_s": med("commit_tail"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
