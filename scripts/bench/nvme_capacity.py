"""Capacity of the NVMe tier: a run that fits in a memory cgroup only with ``zero.offload=nvme``.

One rank, ZeRO stage 2, fp32 AdamW: in memory the model state takes 16P bytes (4P parameters,
4P gradient, 8P moments); with the tier 8P stay in memory (parameters, gradient) plus the
tier's part buffers, and 12P (masters, moments) go to files written with O_DIRECT (so no page
cache holds them). Each run is a worker process placed in its own cgroup-v1 memory group
before it starts (needs root and ``/sys/fs/cgroup/memory``):

1. both modes without a limit: peak usage (``memory.max_usage_in_bytes``) and losses;
2. the limit set halfway between the two peaks; both modes again: the tier run finishes with
   the same losses (bitwise), the in-memory run is killed by the limit.

Prints ONE JSON line (peaks, limit, model-state bytes, losses, exit codes). The default is a
small model for the test suite; ``--d-model 1024 --layers 24 --vocab 50304`` is ~355M
parameters (the documented capacity run, docs/zero-engine.md).

    python scripts/bench/nvme_capacity.py --dir DIR [--d-model 384 --layers 2 --vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CGROUP = "/sys/fs/cgroup/memory"


def worker(args: argparse.Namespace) -> None:
    """Train ``args.steps`` steps in this process; print losses and the tier's figures."""
    import torch

    from loco.engine.zero import ZeroEngine
    from loco.model.gpt import GPT, GPTConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers,
                    n_head=max(1, args.d_model // 64), d_model=args.d_model)  # fmt: skip
    eng = ZeroEngine(GPT(cfg), stage=2, optim="adamw", weight_decay=0.1, bucket_mb=4,
                     offload=args.worker, nvme_dir=args.dir, nvme_part_mb=args.part_mb)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    losses, t0 = [], time.perf_counter()
    for _ in range(args.steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        loss = eng.model(x[:, :-1], x[:, 1:])
        eng.backward(loss)
        eng.step(1e-3)
        losses.append(float(loss))
    ts = eng.tier_step
    out = {"numel": eng.numel, "losses": losses, "s_per_step": (time.perf_counter() - t0) / args.steps,
           "direct": bool(ts and ts.tier.direct), "tier_file_bytes": ts.tier.file_bytes if ts else 0,
           "tier_buffer_bytes": ts.tier.buffer_bytes if ts else 0}  # fmt: skip
    eng.close()
    print(json.dumps(out), flush=True)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def run_in_cgroup(args: argparse.Namespace, mode: str, limit: int | None) -> dict:
    """Run a worker of ``mode`` in a fresh memory cgroup (``limit`` bytes, or none)."""
    group = os.path.join(CGROUP, f"loco-nvme-{os.getpid()}-{mode}")
    os.mkdir(group)
    try:
        if limit is not None:
            _write(os.path.join(group, "memory.limit_in_bytes"), str(limit))
            if os.path.exists(os.path.join(group, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(group, "memory.memsw.limit_in_bytes"), str(limit))
        _write(os.path.join(group, "memory.swappiness"), "0")
        procs = os.path.join(group, "cgroup.procs")
        cmd = [sys.executable, __file__, "--worker", mode, *_worker_args(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              preexec_fn=lambda: _write(procs, str(os.getpid())))  # fmt: skip
        with open(os.path.join(group, "memory.max_usage_in_bytes")) as f:
            peak = int(f.read())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
        return {**res, "rc": proc.returncode, "peak_bytes": peak, "stderr": proc.stderr[-300:]}
    finally:
        for _ in range(50):  # the group's last process may take a moment to leave
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


def _worker_args(args: argparse.Namespace) -> list[str]:
    return ["--dir", args.dir, "--vocab", str(args.vocab), "--d-model", str(args.d_model),
            "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
            "--steps", str(args.steps), "--part-mb", str(args.part_mb)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="the tier's folder (a local disk)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--part-mb", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", choices=("false", "nvme"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    free = {m: run_in_cgroup(args, m, None) for m in ("nvme", "false")}
    limit = (free["nvme"]["peak_bytes"] + free["false"]["peak_bytes"]) // 2
    capped = {m: run_in_cgroup(args, m, limit) for m in ("nvme", "false")}
    numel = free["false"].get("numel", 0)
    print(json.dumps({
        "bench": "nvme_capacity", "numel": numel, "state_bytes_in_memory": 16 * numel,
        "limit_bytes": limit, "peak_free": {m: r["peak_bytes"] for m, r in free.items()},
        "peak_capped": {m: r["peak_bytes"] for m, r in capped.items()},
        "rc_capped": {m: r["rc"] for m, r in capped.items()},
        "losses_free": {m: r.get("losses") for m, r in free.items()},
        "losses_capped_nvme": capped["nvme"].get("losses"),
        "s_per_step": {m: r.get("s_per_step") for m, r in free.items()},
        "direct": free["nvme"].get("direct"), "tier_file_bytes": free["nvme"].get("tier_file_bytes"),
        "tier_buffer_bytes": free["nvme"].get("tier_buffer_bytes"),
        "stderr_capped_false": capped["false"]["stderr"][-200:],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
