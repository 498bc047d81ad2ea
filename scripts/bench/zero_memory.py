"""Bytes of model state per rank for ZeRO stages 0-3, torch DDP and FSDP2, vs the paper.

Runs N gloo ranks on this machine (N = 2 and 3), builds the same model for each engine, takes
optimizer steps, and measures the bytes of every live tensor storage on rank 0 (all tensors the
garbage collector can see, each storage once) minus what was live before the model existed:

- ``steady``: after ``step`` (parameters, gradient buffers, master weights, optimizer state);
- ``peak``: the maximum sampled inside forward/backward (adds stage 2 buckets in flight and
  stage 3's gathered blocks).

The paper's formulas for fp32 AdamW (4 bytes weights, 4 gradients, 8 optimizer state; no
separate master copy) are 16P, 8P + 8P/N, 4P + 12P/N and 16P/N bytes. Prints ONE JSON line.

    python scripts/bench/zero_memory.py [--model small] [--bucket-mb 1]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.engine.zero import ZeroEngine
from loco.model.gpt import build_model

FORMULA = {
    0: lambda P, N: 16 * P,
    1: lambda P, N: 8 * P + 8 * P / N,
    2: lambda P, N: 4 * P + 12 * P / N,
    3: lambda P, N: 16 * P / N,
}


def live_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objs:
        try:
            s = o.untyped_storage()
            n, ptr = s.nbytes(), s.data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        if n:
            seen[ptr] = max(seen.get(ptr, 0), n)
    return sum(seen.values())


class Sampler:
    """Samples ``live_bytes`` at module boundaries and gradient hooks to find the peak."""

    def __init__(self, model: torch.nn.Module, base: int) -> None:
        self.base, self.peak = base, 0
        for m in model.modules():
            m.register_forward_pre_hook(lambda *a: self.sample())
            m.register_forward_hook(lambda *a: self.sample())
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: self.sample())

    def sample(self) -> None:
        self.peak = max(self.peak, live_bytes() - self.base)


def _measure(kind: str, stage: int, rank: int, world: int, args: argparse.Namespace) -> dict:
    gc.collect()
    x = torch.randint(0, 256, (2, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    base = live_bytes()
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=256, seq_len=args.seq_len)
    P = model.num_params()
    if kind == "zero":
        eng = ZeroEngine(model, stage=stage, optim="adamw", bucket_mb=args.bucket_mb)
        fwd = eng.model

        def step() -> None:
            eng.step(1e-4)

        backward = eng.backward
    else:
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fwd = fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(fwd.parameters(), lr=1e-4, foreach=True)

        def step() -> None:
            opt.step()
            opt.zero_grad(set_to_none=False)

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

    sampler = Sampler(fwd if kind != "zero" else model, base)
    for _ in range(2):
        backward(fwd(x[:, :-1], x[:, 1:]))
        step()
    gc.collect()
    steady = live_bytes() - base
    return {"P": P, "steady": steady, "peak": max(sampler.peak, steady)}


def _worker(rank: int, world: int, path: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    rows = []
    try:
        for kind, stage in [("zero", s) for s in range(4)] + [("ddp", 0), ("fsdp2", 3)]:
            m = _measure(kind, stage, rank, world, args)
            P = m["P"]
            ref = FORMULA[stage](P, world)
            name = f"stage{stage}" if kind == "zero" else kind
            rows.append(
                {
                    "engine": name,
                    "N": world,
                    "steady_bytes": m["steady"],
                    "peak_bytes": m["peak"],
                    "formula_bytes": int(ref),
                    "steady_over_formula": round(m["steady"] / ref, 4),
                }
            )
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--worlds", default="2,3")
    args = ap.parse_args()
    rows: list[dict] = []
    P = build_model(args.model, vocab_size=256, seq_len=args.seq_len).num_params()
    for world in [int(w) for w in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "rows.json")
            mp.spawn(
                _worker, args=(world, os.path.join(d, "store"), args, out), nprocs=world, join=True
            )
            with open(out) as f:
                rows += json.load(f)
    within = all(
        abs(r["steady_over_formula"] - 1) <= 0.05 for r in rows if r["engine"].startswith("stage")
    )
    print(
        json.dumps(
            {
                "bench": "zero_memory",
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                "model": args.model,
                "P": P,
                "bucket_mb": args.bucket_mb,
                "rows": rows,
                "stages_within_5pct_steady": within,
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
