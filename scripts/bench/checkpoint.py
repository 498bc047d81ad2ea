"""Benchmark of the asynchronous checkpoint save against ``torch.save`` and ``dd``.

Prints ONE JSON line. A real model trains on one rank (``ZeroEngine``, AdamW, the outer
loop's state): its checkpoint is five fp32 streams of P values (master weights, two moments,
outer phi and momentum) plus RNG state. Each round, alternately, in the same directory:

* ours, as the site runs it: ``save(overlap=True)`` after an optimizer step, then the next
  forward and backward run while the snapshot is copied, then ``fence()`` before the next
  optimizer step. The training stall is the time in ``save`` plus the time in ``fence``;
  the background write (raw bytes, CRC-32 per entry, fsync, manifest, rename, ``latest``)
  is timed apart. Also the blocking variant (``overlap=False``: the copy inside ``save``);
* ``torch.save`` of the same tensors to one file: all of it is a stall (no fsync, as usually
  called, which favours it);
* ``dd if=/dev/zero bs=16M conv=fsync`` of the same byte count: the disk's sequential rate.

Ratios are per round, figures are medians over ``--rounds``: ``stall_vs_torch_save`` (goal
<= 0.10), ``stall_sync_vs_torch_save`` (the blocking copy), ``write_vs_dd`` = our write
throughput (rank-file bytes / write + checksum + fsync time, of the blocking variant's write,
which like dd runs alone) / dd's (goal >= 0.80); ``write_overlapped_s`` is the overlapped
save's write, which shares the cores with the next training step.

    python scripts/bench/checkpoint.py                    # d_model 512, 4 layers: ~17M params
    python scripts/bench/checkpoint.py --d-model 256 --rounds 3    # quick
    python scripts/bench/checkpoint.py --device cuda      # GPU: side-stream copy to pinned memory
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

from loco.checkpoint import CheckpointWriter, capture
from loco.checkpoint.format import layout_json, plan
from loco.checkpoint.state import streams_of
from loco.engine.zero import ZeroEngine
from loco.model.gpt import GPT, GPTConfig
from loco.outer.flat_view import FlatView
from loco.outer.loop import OuterLoop
from loco.outer.methods import build_outer
from loco.site_comm import SiteComm


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
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in .)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.n_layer,
                    n_head=8, d_model=args.d_model)  # fmt: skip
    engine = ZeroEngine(GPT(cfg).to(dev), stage=0, optim="adamw", lr=1e-4)
    outer = OuterLoop(step=build_outer("local"), flat=FlatView(engine), H=1000, steps=10**6)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=dev)

    def fwd_bwd() -> None:
        engine.backward(engine.model(x[:, :-1], x[:, 1:]))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or "."))
    meta = {"layout": layout_json(engine.layout)}
    writer = CheckpointWriter(base / "ours", keep=1, meta=meta)
    rows, nbytes = [], 0
    try:
        for r in range(args.rounds + 1):  # round 0 warms the staging buffer and the cache
            fwd_bwd()
            engine.step(1e-4)
            sync()
            tensors, span, scalars = capture(engine, outer, comm=SiteComm.single())
            nbytes = plan(tensors)[1]
            m = {"streams": streams_of(tensors)}
            t0 = time.perf_counter()
            writer.save(2 * r, tensors, range=span, scalars=scalars, manifest=m, overlap=True)
            stall_save = time.perf_counter() - t0
            fwd_bwd()  # the next step's compute, beside the copy
            t0 = time.perf_counter()
            writer.fence()
            sync()
            stall = stall_save + time.perf_counter() - t0
            engine.step(1e-4)
            writer.wait()
            write_overlapped_s = writer.write_seconds  # shared the cores with training
            sync()
            # the blocking variant: the copy inside save
            t0 = time.perf_counter()
            writer.save(2 * r + 1, tensors, range=span, scalars=scalars, manifest=m)
            stall_sync = time.perf_counter() - t0
            writer.wait()
            write_s = writer.write_seconds  # alone, like dd
            t0 = time.perf_counter()
            torch.save(tensors, base / "torch.pt")
            ts = time.perf_counter() - t0
            (base / "torch.pt").unlink()
            dd = _dd(base / "dd.bin", nbytes)
            if r == 0:
                continue
            rows.append(dict(stall=stall, stall_sync=stall_sync, torch_save=ts,
                             write_s=write_s, write_overlapped_s=write_overlapped_s,
                             dd=dd))  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(x[k] for x in rows)

    out = {
        "bench": "checkpoint",
        "machine": f"{_cpu_name()}; {os.cpu_count()} cpus; torch {torch.__version__}",
        "device": str(dev),
        "params": engine.numel,
        "bytes": nbytes,
        "rounds": len(rows),
        "stall_s": med("stall"),
        "stall_sync_s": med("stall_sync"),
        "torch_save_s": med("torch_save"),
        "stall_vs_torch_save": statistics.median(x["stall"] / x["torch_save"] for x in rows),
        "stall_sync_vs_torch_save": statistics.median(
            x["stall_sync"] / x["torch_save"] for x in rows
        ),
        "write_s": med("write_s"),
        "write_overlapped_s": med("write_overlapped_s"),
        "write_GBps": statistics.median(nbytes / x["write_s"] / 1e9 for x in rows),
        "dd_GBps": med("dd") / 1e9,
        "write_vs_dd": statistics.median(nbytes / x["write_s"] / x["dd"] for x in rows),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
