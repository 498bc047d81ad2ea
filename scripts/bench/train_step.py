"""Tokens/s of loco's training loop against a minimal plain-torch loop, in the same run.

loco's side is what ``python -m loco.worker`` runs at one rank: ``ZeroEngine`` (stage 0) driven
by ``Trainer``. Both train the same model (same init) on the same batches with AdamW, warmup + cosine LR and
gradient clipping at 1.0. The plain loop gets its batches pre-materialized; loco's loop samples
them itself through ``SiteData`` and logs metrics, so the ratio charges loco for everything it
adds. Rounds alternate plain / loco to spread machine noise over both; the medians are compared.

    python scripts/bench/train_step.py [--steps 20] [--rounds 3] [--sizes tiny,small]

Prints one JSON line. Goal: loco / plain >= 0.95 for every size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loco.data import SiteData, stdlib_corpus
from loco.engine.base import param_groups
from loco.engine.zero import ZeroEngine
from loco.metrics import MetricsWriter
from loco.model import build_model
from loco.trainer import Trainer, lr_schedule

LR = dict(lr=3e-3, warmup_steps=5, min_lr_ratio=0.1)


def plain_loop(model, batches, steps: int) -> float:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR["lr"], betas=(0.9, 0.95), foreach=True)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = batches[step]
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, steps=steps, **LR)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def loco_loop(model, data: SiteData, steps: int, seq_len: int, tmp: Path) -> float:
    engine = ZeroEngine(model, optim="adamw", lr=LR["lr"], weight_decay=0.1, grad_clip=1.0, stage=0)
    metrics = MetricsWriter(tmp / "metrics.jsonl", site="bench", rank=0)
    trainer = Trainer(
        engine=engine,
        data=data,
        steps=steps,
        seq_len=seq_len,
        eval_every=10**9,
        eval_at_end=False,
        log_every=10,
        metrics=metrics,
        **LR,
    )
    t0 = time.perf_counter()
    trainer.fit(0)
    dt = time.perf_counter() - t0
    metrics.close()
    return dt


def bench_size(
    size: str, corpus, steps: int, rounds: int, batch: int, seq_len: int, tmp: Path
) -> dict:
    data = SiteData(
        corpus,
        site="bench",
        shard=0,
        num_shards=3,
        split="iid",
        chunk_tokens=16384,
        val_fraction=0.05,
        seq_len=seq_len,
        batch_size=batch,
        grad_accum=1,
        rank=0,
        world=1,
        seed=0,
    )
    batches = [data.train_batch(s, 0) for s in range(steps)]
    tokens = steps * batch * seq_len

    def fresh():
        torch.manual_seed(0)
        return build_model(size, vocab_size=256, seq_len=seq_len)

    plain_loop(fresh(), batches, 3)  # warm up allocator and kernels
    plain, loco = [], []
    for _ in range(rounds):
        plain.append(tokens / plain_loop(fresh(), batches, steps))
        loco.append(tokens / loco_loop(fresh(), data, steps, seq_len, tmp))
    p, lo = statistics.median(plain), statistics.median(loco)
    # adjacent runs share the machine's load of the moment: the median of per-round ratios is
    # the robust figure on a shared machine
    ratio = statistics.median(b / a for a, b in zip(plain, loco, strict=True))
    return {
        "params": fresh().num_params(),
        "plain_tok_s": round(p),
        "loco_tok_s": round(lo),
        "ratio": round(ratio, 3),
        "plain_all": [round(v) for v in plain],
        "loco_all": [round(v) for v in loco],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    corpus = stdlib_corpus()
    out = {
        "bench": "train_step",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": a.threads,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "rounds": a.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            out[size] = bench_size(size, corpus, a.steps, a.rounds, a.batch, a.seq_len, Path(tmp))
    out["goal_ratio"] = 0.95
    out["ok"] = all(out[s]["ratio"] >= 0.95 for s in a.sizes.split(","))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
