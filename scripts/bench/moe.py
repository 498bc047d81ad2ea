"""Mixture of experts beside the dense model with the same active parameters, N ranks on gloo.

One run, N ranks (default 2), the same global batch: the dense ``tiny`` GPT (the reference),
``moe-tiny`` with every rank computing every expert (ep = 1), and ``moe-tiny`` with the experts
shared by the N ranks (ep = N, tokens dispatched and combined by all-to-all), once with every
rank's compute copy holding every expert (``moe_ep_full``: the reference) and once with each
rank owning its experts (``moe_ep``, ``loco.engine.experts``). With k = 1 a token
meets as many weights in moe-tiny as in tiny (the *active* parameters are equal; moe-tiny holds
8 experts per MoE MLP). Every engine is built up front and they take turns, a few steps each,
for several rounds, so machine noise hits all alike. Per configuration:

- tokens/s of the site (global tokens per step over the median step time);
- memory per rank: the engine's state (compute parameters, fp32 masters, gradients, optimizer
  moments held by this rank) and the activations saved for backward in one step (bytes of the
  tensors autograd keeps, counted by ``saved_tensors_hooks``); on CUDA the peak allocated too;
  per buffer the gradient (``grad_bytes``) and the optimizer state (``optim_state_bytes``)
  against their formulas (``_held_memory``); at stage 3 also the block buffers (``unit_bytes``: every unit gathered at once;
  ``max_unit_bytes``: the largest one), which hold only a rank's own experts with ep > 1
  (``loco.engine.experts``), against the formulas ``4 (P - X + X / ep)`` and
  ``4 (D_k + X_k / ep)`` (X: the experts' parameters, D_k and X_k: a block's dense and expert
  parameters); at stages 0-2 the compute copy (``compute_bytes``), which at stages 0-2 with
  ep > 1 holds the dense part and the rank's own experts, against ``4 (P - X + X / ep)`` (fp32;
  the masters then have their own ``4 P / N``, at stage 0 ``4 S_r``: the dense part and the
  experts of rank r's shard, ``loco.engine.replica``);
- all-to-all bytes per step and rank (counted at ``SiteComm.all_to_all``) against the formula
  ``moe_layers * 4 * E * C * d * 4``: 2 exchanges forward (dispatch, combine) and 2 backward
  of the (E, C, d) fp32 buffer, C = max(min_capacity, ceil(capacity_factor * k * S / E)), S the
  rank's tokens per step.

Prints ONE JSON line.

    python scripts/bench/moe.py [--world 2] [--batch 8] [--seq-len 64] [--rounds 5] [--steps 2]
        [--stage 2] [--k 1] [--capacity-factor 1.25] [--size tiny|small] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.engine.zero import ZeroEngine
from loco.model import MoEOptions, build_model
from loco.site_comm import SiteComm

CONFIGS = ("dense", "moe_ep1", "moe_ep_full", "moe_ep")


def _saved_bytes(fn: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _engine_bytes(eng: ZeroEngine) -> int:
    bufs = [eng.flat_param, eng.master, eng.grad, *eng.optimizer.state.values()]
    seen, total = set(), 0
    for t in bufs:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _build(kind: str, args: argparse.Namespace, comm: SiteComm, device: torch.device):
    torch.manual_seed(0)
    opts = MoEOptions(k=args.k, capacity_factor=args.capacity_factor)
    size = args.size if kind == "dense" else f"moe-{args.size}"
    model = build_model(size, vocab_size=256, seq_len=args.seq_len, moe=opts,
                        ep=1 if kind == "moe_ep1" else comm.world).to(device)  # fmt: skip
    if kind != "dense":
        model.bind_site(comm)
    if kind == "moe_ep_full":  # the reference: ep = N, every rank's copy holding every expert
        model.expert_rows = lambda world: {}
    eng = ZeroEngine(model, stage=args.stage, optim="adamw", comm=comm)
    return model, eng


def _compute_memory(model, eng: ZeroEngine, ep: int) -> dict[str, int | bool]:
    """Stages 0-2's compute copy against the formula: the padded flat space, or at stage 2 with
    ep > 1 the dense part and this rank's experts, ``P - X + X / ep`` values."""
    if eng.flat_param is None:
        return {}
    X = sum(eng.layout.spec(n).numel for n, _ in model.named_parameters() if ".experts." in n)
    size = eng.compute_dtype.itemsize
    want = size * (eng.layout.numel - X + X // ep if eng.compact is not None else eng.padded)
    got = eng.flat_param.numel() * eng.flat_param.element_size()
    return {"compute_bytes": got, "compute_bytes_formula": want,
            "compute_bytes_match_formula": got == want}  # fmt: skip


def _held_memory(model, eng: ZeroEngine, ep: int) -> dict[str, int | bool]:
    """Per rank: gradient and optimizer state (fp32 masters, moments; a master that is a view
    of the compute copy counts there) against the formulas: the gradient is ``4 P`` at stages
    0-1 (``4 P / N`` at stage 1 with expert rows, as at stages 2-3); the state ``4 P (1 + m)``
    replicated at stage 0, ``4 (P / N) (1 + m)`` otherwise (m moments); at stage 0 with expert
    rows the gradient ``4 S_r`` and the state ``4 S_r (1 + m)`` (``_replica_space``)."""
    n, world = eng.padded, eng.world
    moments = list(eng.optimizer.state.values())
    own_master = (
        eng.flat_param is None or eng.master.data_ptr() != eng.flat_param[eng.opt_lo :].data_ptr()
    )
    optim = sum(t.numel() * 4 for t in moments) + (eng.master.numel() * 4 if own_master else 0)
    rng = n if eng.stage == 0 else n // world
    grad_want = 4 * (n if eng.stage < 2 and eng.compact is None else n // world)
    if eng.stage == 0 and eng.compact is not None:  # the replica space (loco.engine.replica)
        rng = grad_want = _replica_space(eng)
        grad_want *= 4
    optim_want = 4 * rng * (len(moments) + (1 if own_master else 0))
    return {"grad_bytes": eng.grad.numel() * 4, "grad_bytes_formula": grad_want,
            "optim_state_bytes": optim, "optim_state_bytes_formula": optim_want,
            "held_bytes_match_formula": eng.grad.numel() * 4 == grad_want
            and optim == optim_want}  # fmt: skip


def _replica_space(eng: ZeroEngine) -> int:
    """Stage 0 with expert rows: values of this rank's fp32 buffers, the dense part and its
    shard's experts, ``(P - X) + |X ∩ [lo, hi)|`` (and the shard's padding)."""
    experts = [s for s in eng.layout.specs if ".experts." in s.name]
    P, X = eng.layout.numel, sum(s.numel for s in experts)
    in_shard = sum(max(0, min(s.end, eng.hi) - max(s.offset, eng.lo)) for s in experts)
    return P - X + in_shard + max(0, eng.hi - max(eng.lo, P))


def _unit_memory(model, eng: ZeroEngine, ep: int) -> dict[str, int | bool]:
    """Stage 3's block buffers (bytes if every unit were gathered, the largest unit) against
    the formulas: a block holds its dense parameters and 1/ep of its experts."""
    if eng.shards is None:
        return {}
    units = [u.buf.numel() * u.buf.element_size() for u in eng.shards.units]
    size = eng.compute_dtype.itemsize
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    X = sum(eng.layout.spec(n).numel for n in experts)
    want_all = size * (eng.layout.numel - X + X // ep)
    want_max = 0
    for u in eng.shards.units:
        specs = [eng.layout.specs[i] for i in u.params]
        xk = sum(s.numel for s in specs if s.name in experts)
        want_max = max(want_max, size * (sum(s.numel for s in specs) - xk + xk // ep))
    return {
        "unit_bytes": sum(units),
        "unit_bytes_formula": want_all,
        "max_unit_bytes": max(units),
        "max_unit_bytes_formula": want_max,
        "unit_bytes_match_formula": sum(units) == want_all and max(units) == want_max,
    }


def _rank(rank: int, world: int, path: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    device = torch.device(args.device)
    comm = SiteComm()
    built = {k: _build(k, args, comm, device) for k in CONFIGS}
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, 256, (args.batch // world, args.seq_len + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step(kind: str) -> None:
        model, eng = built[kind]
        eng.backward(model(inp, tgt))
        eng.step(1e-3)

    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    a2a: dict[str, float] = {}
    saved: dict[str, int] = {}
    peak: dict[str, int] = {}
    for k in CONFIGS:
        step(k)  # warm up
    for _ in range(args.rounds):
        for k in CONFIGS:
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(k)
            times[k].append((time.perf_counter() - t0) / args.steps)
    for k in CONFIGS:
        model, eng = built[k]
        groups = {id(m.experts.comm): m.experts.comm for m in getattr(model, "moe_layers", list)()}
        for grp in groups.values():
            grp.stats.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        saved[k] = _saved_bytes(lambda model=model, eng=eng: eng.backward(model(inp, tgt)))
        eng.step(1e-3)
        if device.type == "cuda":
            peak[k] = torch.cuda.max_memory_allocated()
        a2a[k] = sum(grp.stats.bytes.get("all_to_all", 0) for grp in groups.values())
    if rank == 0:
        out = _report(args, world, built, times, saved, a2a, peak)
        print(json.dumps(out))
    dist.destroy_process_group()


def _report(args, world, built, times, saved, a2a, peak) -> dict:
    tokens = args.batch * args.seq_len
    moe_model = built["moe_ep"][0]
    opts, d = moe_model.moe, moe_model.cfg.d_model
    S = tokens // world
    cap = opts.capacity(S)
    formula = len(moe_model.moe_layers()) * 4 * opts.experts * cap * d * 4
    res = {"bench": "moe", "size": args.size, "world": world, "stage": args.stage, "k": opts.k,
           "capacity_factor": opts.capacity_factor, "global_tokens_per_step": tokens,
           "threads_per_rank": 1, "device": args.device}  # fmt: skip
    for k in CONFIGS:
        model, eng = built[k]
        med = statistics.median(times[k])
        res[k] = {
            "params": model.num_params(),
            "tokens_per_s": round(tokens / med, 1),
            "step_ms": round(med * 1e3, 2),
            "state_bytes_per_rank": _engine_bytes(eng),
            "saved_activation_bytes_per_rank": saved[k],
            "all_to_all_bytes_per_rank_step": a2a[k],
            **({"peak_allocated": peak[k]} if k in peak else {}),
            **_unit_memory(model, eng, world if k == "moe_ep" else 1),
            **_compute_memory(model, eng, world if k == "moe_ep" else 1),
            **_held_memory(model, eng, world if k == "moe_ep" else 1),
        }
    res["moe_ep"]["all_to_all_formula"] = formula
    res["moe_ep"]["all_to_all_matches_formula"] = a2a["moe_ep"] == formula
    for k in ("moe_ep1", "moe_ep_full", "moe_ep"):
        res[k]["tokens_per_s_vs_dense"] = round(
            res[k]["tokens_per_s"] / res["dense"]["tokens_per_s"], 3
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per turn")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        mp.spawn(_rank, args=(args.world, path, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
