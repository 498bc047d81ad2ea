"""loco's ZeRO stages 1-3 beside DeepSpeed ZeRO 1-3 on the CPU, N gloo ranks, in one run.

Needs DeepSpeed (``pip install 'loco[peers]'``, DeepSpeed 0.19; its CPU accelerator is chosen
with ``DS_ACCELERATOR=cpu``, set here). Every engine is built on the same GPT, the same seed and
the same batch, under one gloo process group (``deepspeed.init_distributed(dist_backend="gloo")``,
which loco's engine also uses). Per engine, on rank 0:

- ``state_bytes``: bytes of every live tensor storage after two steps minus before the model
  existed (the method of ``zero_memory.py``: what the garbage collector can reach, each storage
  once), i.e. torch-allocated state per rank, not RSS;
- ``median_step_ms``: forward, backward and optimizer step, the engines taking turns one step
  each for ``--rounds`` rounds so machine noise hits them alike.

DeepSpeed's optimizer is ``torch.optim.AdamW`` (``torch_adam``: its fused CUDA Adam does not run
on the CPU); loco's is its flat AdamW. Also, one thread, same parameters: the ZeRO-Offload
optimizer step (``DeepSpeedCPUAdam``, AdamW mode) against loco's flat CPU AdamW
(``loco.engine.flat_optim``, what loco's offload step runs) and ``torch.optim.AdamW(fused=True)``.
Prints ONE JSON line.

    python scripts/bench/peers_deepspeed.py [--model tiny] [--batch 8] [--seq-len 64] [--rounds 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero_memory import live_bytes  # noqa: E402

from loco.dist import free_port  # noqa: E402
from loco.engine.flat import FlatLayout  # noqa: E402
from loco.engine.flat_optim import build_flat_optimizer  # noqa: E402
from loco.engine.zero import ZeroEngine  # noqa: E402
from loco.model.gpt import build_model  # noqa: E402

STAGES = (1, 2, 3)
# ZeRO-Offload: stage 2 with the optimizer on the host (DeepSpeed: offload_optimizer cpu, which
# runs DeepSpeedCPUAdam; loco: zero.offload=cpu, on a CPU run the in-memory flat step)
OFFLOAD = "2_offload"
KINDS = [f"{s}{n}" for n in (*STAGES, OFFLOAD) for s in ("loco", "ds")]


def _ds_config(stage: int, args: argparse.Namespace, offload: bool = False) -> dict:
    bucket = int(args.bucket_mb * 2**20 / 4)  # elements, as DeepSpeed counts them
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            # DeepSpeed's default (1e5) keeps every tensor under 100k elements whole on every
            # rank: nearly all of a tiny model, which would not be ZeRO-3 at all
            "stage3_param_persistence_threshold": args.ds_persistence,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload:  # DeepSpeed then builds DeepSpeedCPUAdam (torch_adam would refuse)
        cfg["optimizer"]["params"].pop("torch_adam")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return cfg


def _build(kind: str, args: argparse.Namespace) -> Callable[[torch.Tensor], None]:
    """An engine as a ``train_step(x)`` closure: ``loco1..3``, ``ds1..3``, ``loco2_offload``
    or ``ds2_offload``."""
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=256, seq_len=args.seq_len)
    offload = kind.endswith(OFFLOAD)
    stage = 2 if offload else int(kind[-1])
    if kind.startswith("loco"):
        eng = ZeroEngine(model, stage=stage, optim="adamw", bucket_mb=args.bucket_mb,
                         offload="cpu" if offload else False)  # fmt: skip

        def step(x: torch.Tensor) -> None:
            eng.backward(eng.model(x[:, :-1], x[:, 1:]))
            eng.step(1e-4)

        return step
    import deepspeed

    ds, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(stage, args, offload)
    )

    def ds_step(x: torch.Tensor) -> None:
        ds.backward(ds(x[:, :-1], x[:, 1:]))
        ds.step()

    return ds_step


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
    )  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(args.threads)
    kinds = KINDS
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g)
    steps, state = {}, {}
    try:
        for k in kinds:  # one at a time, so each one's tensors are its own increment
            base = live_bytes()
            steps[k] = _build(k, args)
            for _ in range(2):
                steps[k](x)
            state[k] = live_bytes() - base
            dist.barrier()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for k in kinds:
                dist.barrier()
                t = time.perf_counter()
                steps[k](x)
                times[k].append(time.perf_counter() - t)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        with open(out, "w") as f:
            json.dump({"median_s": med, "state_bytes": state}, f)


def _offload_adam(model_name: str, reps: int = 20) -> dict:
    """One-thread AdamW step over one model's parameters: DeepSpeedCPUAdam, loco flat, torch."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.set_num_threads(1)
    model = build_model(model_name, vocab_size=256, seq_len=64)
    layout = FlatLayout(model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    ds = DeepSpeedCPUAdam(groups, lr=1e-4, betas=(0.9, 0.95), adamw_mode=True)
    ref = torch.optim.AdamW(
        [dict(g, params=list(g["params"])) for g in groups], lr=1e-4, fused=True
    )
    flat, grad = layout.flatten(), torch.randn(layout.numel)
    ours = build_flat_optimizer(
        "adamw", 0, layout.numel, layout.decay_runs((0, layout.numel)), weight_decay=0.1,
        betas=(0.9, 0.95), eps=1e-8, momentum=0.0, nesterov=False, device=torch.device("cpu"),
    )  # fmt: skip
    runs: dict[str, list[float]] = {"loco_flat": [], "deepspeed_cpu_adam": [], "torch_fused": []}
    fns = {
        "loco_flat": lambda: ours.step(flat, grad, 1e-4),
        "deepspeed_cpu_adam": ds.step,
        "torch_fused": ref.step,
    }
    for _ in range(reps + 2):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    ms = {k: statistics.median(v[2:]) * 1e3 for k, v in runs.items()}
    return {
        "params": layout.numel,
        "threads": 1,
        "median_ms": {k: round(v, 3) for k, v in ms.items()},
        "loco_over_deepspeed": round(ms["loco_flat"] / ms["deepspeed_cpu_adam"], 3),
        "deepspeed_over_torch_fused": round(ms["deepspeed_cpu_adam"] / ms["torch_fused"], 3),
    }


def summarize(med: dict[str, float], state: dict[str, int]) -> dict:
    """Per stage: loco and DeepSpeed step time and state bytes, and loco over DeepSpeed."""
    rows = {}
    for s in (*STAGES, OFFLOAD):
        lo, ds = f"loco{s}", f"ds{s}"
        rows[f"stage{s}"] = {
            "loco_step_ms": round(1e3 * med[lo], 2),
            "ds_step_ms": round(1e3 * med[ds], 2),
            "step_loco_over_ds": round(med[lo] / med[ds], 3),
            "loco_state_bytes": state[lo],
            "ds_state_bytes": state[ds],
            "state_loco_over_ds": round(state[lo] / state[ds], 3),
        }
    return rows


def require(name: str):  # noqa: ANN201
    """Import a peer, or exit 2 with one line naming the fix."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        print(f"{name} is not installed ({e}): pip install 'loco[peers]'", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--adam-model", default="small")
    ap.add_argument(
        "--ds-persistence",
        type=int,
        default=0,
        help="DeepSpeed stage3_param_persistence_threshold (its default: 100000)",
    )
    args = ap.parse_args()
    deepspeed = require("deepspeed")

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        mp.spawn(_worker, args=(args.world, free_port(), args, out), nprocs=args.world)
        with open(out) as f:
            res = json.load(f)
    P = build_model(args.model, vocab_size=256, seq_len=args.seq_len).num_params()
    line = {
        "bench": "peers_deepspeed",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "deepspeed": deepspeed.__version__,
        "backend": "gloo",
        "device": "cpu",
        "dtype": "fp32",
        "N": args.world,
        "model": args.model,
        "P": P,
        "batch": [args.batch, args.seq_len],
        "ds_stage3_param_persistence_threshold": args.ds_persistence,
        "state_bytes_method": "live tensor storages on rank 0 after 2 steps, minus before",
        "stages": summarize(res["median_s"], res["state_bytes"]),
        "paper_state_over_P": {
            "stage1": 8 + 8 / args.world,
            "stage2": 4 + 12 / args.world,
            "stage3": 16 / args.world,
        },  # fmt: skip
        "offload_adam": _offload_adam(args.adam_model),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
