"""Step time of ZeRO stages 0-3 beside torch DDP and FSDP2 (``fully_shard``), N ranks on gloo.

One run, same model, same batches, same thread count (1 per rank): every engine is built up
front and the engines take turns, a few steps each, for several rounds (so machine noise hits
all of them alike); the figure is the median step time (forward, backward, step). Also, in the
same run:

- bytes each rank hands to collectives in one step (counted at our collective calls), over
  P fp32 words: the paper's 2P for stages 0-2 and 3P for stage 3;
- the gradient collective on this backend: a 4 MiB bucket reduced to its owners
  (``reduce``, what ``collective=auto`` uses), ``all_reduce``, and ``reduce_scatter_tensor``;
- the CPU optimizer step: loco's flat AdamW vs ``torch.optim.AdamW(fused=True)`` on the same
  parameters (one thread, ``--adam-model``).

Prints ONE JSON line.

    python scripts/bench/zero_step.py [--model tiny] [--batch 8] [--seq-len 64] [--rounds 30] [--steps 1]
        [--dtype bf16] [--device cuda --world 1]   # on a GPU machine: adds stage2_offload
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.engine.flat import FlatLayout
from loco.engine.flat_optim import build_flat_optimizer
from loco.engine.zero import ZeroEngine
from loco.model.gpt import build_model


def _build(
    kind: str, args: argparse.Namespace, world: int, device: torch.device
) -> tuple[Callable, dict]:
    """An engine as a ``train_step(x)`` closure, plus its byte counter (ours only)."""
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=256, seq_len=args.seq_len).to(device)
    bf16 = args.dtype == "bf16"
    if kind.startswith("stage"):
        stage = int(kind[5])
        collective = "allreduce" if kind.endswith("allreduce") else "auto"
        eng = ZeroEngine(
            model,
            stage=stage,
            optim="adamw",
            bucket_mb=args.bucket_mb,
            collective=collective,
            compute_dtype=args.dtype,
            offload=kind.endswith("offload"),
            max_inflight=int(kind.split("inflight")[1]) if "inflight" in kind else 2,
        )

        def step(x: torch.Tensor) -> None:
            eng.backward(eng.model(x[:, :-1], x[:, 1:]))
            eng.step(1e-4)

        return step, {"stats": eng.comm.stats}
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        mp_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
        )
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
        fwd = fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    opt = torch.optim.AdamW(fwd.parameters(), lr=1e-4, foreach=True)
    # DDP computes in bf16 through autocast (its parameters stay fp32)
    autocast = kind == "ddp" and bf16

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, {}


def _collectives(
    rank: int, world: int, numel: int, device: torch.device, reps: int = 10
) -> dict[str, float]:
    buf = torch.randn(numel, device=device)
    size = numel // world
    out = torch.empty(size, device=device)

    def reduce() -> None:
        works = [
            dist.reduce(buf[r * size : (r + 1) * size], dst=r, async_op=True) for r in range(world)
        ]
        for w in works:
            w.wait()

    def allreduce() -> None:
        dist.all_reduce(buf)

    def reduce_scatter() -> None:
        dist.reduce_scatter_tensor(out, buf)

    res = {}
    for name, fn in [
        ("reduce", reduce),
        ("allreduce", allreduce),
        ("reduce_scatter", reduce_scatter),
    ]:
        fn()
        times = []
        for _ in range(reps):
            _sync(device)
            dist.barrier()
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        res[name + "_ms"] = round(1e3 * statistics.median(times), 3)
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world: int, path: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    store = dist.FileStore(path, world)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        kinds = ["stage0", "stage1", "stage2", "stage2_allreduce", "stage3", "ddp", "fsdp2"]
        kinds += [k for k in args.extra.split(",") if k]
        if device.type == "cuda":
            kinds.insert(3, "stage2_offload")
        engines = {k: _build(k, args, world, device) for k in kinds}
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).to(device)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for k in kinds:  # warm-up, and one counted step for the byte figures
            for _ in range(2):
                engines[k][0](x)
            if "stats" in engines[k][1]:
                engines[k][1]["stats"].reset()
                engines[k][0](x)
        P = build_model(args.model, vocab_size=256, seq_len=args.seq_len).num_params()
        sent = {k: round(e[1]["stats"].total() / (4 * P), 3) for k, e in engines.items() if e[1]}
        for _ in range(args.rounds):
            for k in kinds:
                for _ in range(args.steps):
                    _sync(device)
                    dist.barrier()
                    t = time.perf_counter()
                    engines[k][0](x)
                    _sync(device)
                    times[k].append(time.perf_counter() - t)
        coll = _collectives(rank, world, 2**20, device)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        with open(out, "w") as f:
            json.dump({"P": P, "median_s": med, "sent_over_P": sent, "collective_4MiB": coll}, f)


def _adam_cpu(model_name: str, reps: int = 20) -> dict[str, float]:
    """One-thread AdamW step over the same parameters: flat fused vs torch fused."""
    torch.set_num_threads(1)
    model = build_model(model_name, vocab_size=256, seq_len=64)
    layout = FlatLayout(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-4,
        fused=True,
    )
    flat, grad = layout.flatten(), torch.randn(layout.numel)
    ours = build_flat_optimizer(
        "adamw", 0, layout.numel, layout.decay_runs((0, layout.numel)), weight_decay=0.1,
        betas=(0.9, 0.95), eps=1e-8, momentum=0.0, nesterov=False, device=torch.device("cpu"),
    )  # fmt: skip
    t_ref, t_ours = [], []
    for _ in range(reps):
        t = time.perf_counter()
        ref.step()
        t_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours.step(flat, grad, 1e-4)
        t_ours.append(time.perf_counter() - t)
    a, b = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "params": layout.numel,
        "flat_ms": round(1e3 * a, 3),
        "torch_fused_ms": round(1e3 * b, 3),
        "flat_over_torch_fused": round(a / b, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--adam-model", default="small")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--extra", default="", help="more engines, e.g. stage2_inflight8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        mp.spawn(
            _worker,
            args=(args.world, os.path.join(d, "store"), args, out),
            nprocs=args.world,
            join=True,
        )
        with open(out) as f:
            res = json.load(f)
    med = res["median_s"]
    print(
        json.dumps(
            {
                "bench": "zero_step",
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                "backend": "nccl" if args.device == "cuda" else "gloo",
                "device": args.device,
                "dtype": args.dtype,
                "N": args.world,
                "model": args.model,
                "P": res["P"],
                "batch": [args.batch, args.seq_len],
                "median_step_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
                "over_ddp": {k: round(v / med["ddp"], 3) for k, v in med.items()},
                "stage3_over_fsdp2": round(med["stage3"] / med["fsdp2"], 3),
                "sent_per_rank_over_P": res["sent_over_P"],
                "paper_sent_over_P": {"stage0-2": 2, "stage3": 3},
                "collective_4MiB": res["collective_4MiB"],
                "adam_cpu": _adam_cpu(args.adam_model),
            }
        )
    )


if __name__ == "__main__":
    main()
