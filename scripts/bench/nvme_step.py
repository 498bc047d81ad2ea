"""Step time with the NVMe tier vs CPU offload vs no offload, same model, same run, and the
share of the tier's I/O hidden behind the optimizer's compute.

For each mode (``false``, ``cpu``, ``nvme``; ``cpu`` is ZeRO-Offload, GPU runs only: on a CPU
run it is the in-memory step and is reported as such) one rank trains ``--steps`` steps after
``--warmup``, the modes' steps interleaved, and reports the median step time (forward + backward + optimizer step) and the
median optimizer step alone. For ``nvme`` the tier also reports the time the step sat blocked
on I/O per step, and the time the same reads and writes take with no compute in between
(measured right after, same files): hidden = 1 - blocked / io_only. Prints ONE JSON line.

    python scripts/bench/nvme_step.py --dir DIR [--d-model 512 --layers 4 --vocab 8192]
        [--stage 2] [--device cpu|cuda] [--part-mb 16] [--offload-params (stage 3)]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loco.engine.zero import ZeroEngine
from loco.model.gpt import GPT, GPTConfig


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def io_only(tier) -> float:
    """Seconds to read and write every part with the step's schedule and no compute."""
    n, slots = len(tier.parts), len(tier.slots)
    t0 = time.perf_counter()
    reads, writes = {0: tier.read(0, 0)}, {}
    for k in range(n):
        tier.wait(reads.pop(k))
        if k + 1 < n:
            tier.wait(writes.pop(k + 1 - slots, []))
            reads[k + 1] = tier.read(k + 1, (k + 1) % slots)
        writes[k] = tier.write(k, k % slots)
    for w in writes.values():
        tier.wait(w)
    return time.perf_counter() - t0


def build(mode: str, args: argparse.Namespace) -> ZeroEngine:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers,
                    n_head=max(1, args.d_model // 64), d_model=args.d_model)  # fmt: skip
    params = "nvme" if mode == "nvme" and args.offload_params else "none"
    return ZeroEngine(GPT(cfg).to(args.device), stage=args.stage, optim="adamw",
                      weight_decay=0.1, offload=mode, nvme_dir=args.dir,
                      nvme_part_mb=args.part_mb, offload_params=params)  # fmt: skip


def one_step(eng: ZeroEngine, x: torch.Tensor, device: str) -> tuple[float, float, float]:
    """(step seconds, optimizer-step seconds, loss)."""
    _sync(device)
    t0 = time.perf_counter()
    loss = eng.model(x[:, :-1], x[:, 1:])
    eng.backward(loss)
    _sync(device)
    t1 = time.perf_counter()
    eng.step(1e-3)
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, float(loss.detach())


def run(args: argparse.Namespace, modes: tuple[str, ...]) -> dict[str, dict]:
    """Every mode's engine built first, then their steps interleaved (a noisy neighbour slows
    every mode alike)."""
    engines = {m: build(m, args) for m in modes}
    g = torch.Generator().manual_seed(1)
    rec: dict[str, dict[str, list]] = {m: {"step": [], "optim": [], "loss": []} for m in modes}
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
        for m, eng in engines.items():
            if i == args.warmup and eng.tier_step is not None:
                eng.tier_step.blocked_s = eng.tier_step.step_s = 0.0
            step, opt, loss = one_step(eng, x, args.device)
            rec[m]["loss"].append(loss)
            if i >= args.warmup:
                rec[m]["step"].append(step)
                rec[m]["optim"].append(opt)
    rows = {}
    for m, eng in engines.items():
        r = rec[m]
        rows[m] = {"step_s": statistics.median(r["step"]), "optim_s": statistics.median(r["optim"]),
                   "offload_applied": eng.offload_mode, "losses": r["loss"]}  # fmt: skip
        ts = eng.tier_step
        if ts is not None:
            blocked = ts.blocked_s / args.steps
            serial = statistics.median(io_only(ts.tier) for _ in range(3))
            rows[m].update(io_blocked_s=blocked, io_only_s=serial,
                           hidden=max(0.0, 1 - blocked / serial), tier_step_s=ts.step_s / args.steps,
                           direct=ts.tier.direct, backend=ts.tier.queue.backend,
                           parts=len(ts.tier.parts))  # fmt: skip
        rows[m]["numel"] = eng.numel
        eng.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--part-mb", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload-params", action="store_true", help="stage 3: parameters on the tier")
    args = p.parse_args()
    rows = run(args, ("false", "cpu", "nvme"))
    same = rows["nvme"]["losses"] == rows["false"]["losses"]
    for r in rows.values():
        del r["losses"]
    base = rows["false"]["step_s"]
    print(json.dumps({"bench": "nvme_step", "device": args.device, "stage": args.stage,
                      "offload_params": args.offload_params, "part_mb": args.part_mb,
                      "numel": rows["false"]["numel"], "torch_threads": torch.get_num_threads(),
                      "rows": rows, "step_vs_no_offload": {m: round(r["step_s"] / base, 3)
                                                           for m, r in rows.items()},
                      "nvme_same_losses_as_no_offload": same}))  # fmt: skip


if __name__ == "__main__":
    main()
