"""torchft DiLoCo and LocalSGD beside loco's DiLoCo and NoLoCo: same model, data, H, steps, seed.

Needs torchft (``pip install 'loco[peers]'``, torchft 0.2). Four replica groups (one process
each, one rank per group, gloo, loopback) train loco's GPT on loco's data: replica group ``i``
composes the very configuration site ``i`` of ``python -m loco.local`` composes
(``loco.federation.site_args``), so it draws the same batches from the same shard, builds the
model under the same seed and follows the same warmup + cosine schedule, AdamW (weight decay on
matrices only), gradient clipping; torchft's ``DiLoCo`` (outer SGD, the same lr, momentum and
Nesterov as ``conf/outer/diloco.yaml``) or ``LocalSGD`` syncs every H steps through its
``Manager`` and lighthouse. loco's side runs as real federations (``run_federation``) with
``outer=diloco compression=none`` (its default sliced reduce, and ``outer.diloco_reduce=full``,
every site pulling every other site's whole delta, as the reference), the default NoLoCo, and
LocalSGD as loco's DiLoCo with outer lr 1 and no momentum (the mean of the weights), in the same
invocation.

Figures: final validation loss (mean over groups/sites, ``train.eval_batches`` batches of the
shared validation split), wall time (start of the processes to their end, the same for both),
and bytes moved between replica groups: for torchft the bytes handed to its process group's
``allreduce`` (counted in a ``ProcessGroupGloo`` subclass) times ``2 (n - 1) / n``, what a ring
all-reduce sends per member; for loco the ``bytes_sent`` each site's gossip layer counts.
Quorum and heartbeat traffic of either system is not counted. Prints ONE JSON line.

    python scripts/bench/peers_torchft.py [--steps 200] [--H 50] [--sites 4] [--batch 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

SITES = ["eu", "us", "asia", "sa", "af", "oc", "me", "na"]


# DiLoCo with outer lr 1 and no momentum: theta <- the mean of the sites' weights, LocalSGD
LOCO_LOCALSGD = [
    "outer=diloco", "compression=none", "outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false",
]  # fmt: skip


# the reference: DiLoCo's mean by every site pulling every other site's whole delta
LOCO_DILOCO_FULL = ["outer=diloco", "compression=none", "outer.diloco_reduce=full"]


def ring_bytes(payload: int, n: int) -> float:
    """Bytes one member of a ring all-reduce of ``payload`` bytes over ``n`` members sends."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * payload


def common_overrides(a: argparse.Namespace) -> list[str]:
    """The loco configuration both systems run (what ``python -m loco.local`` is given)."""
    sites = SITES[: a.sites]
    return [
        f"federation.sites=[{','.join(sites)}]", f"model={a.model}", f"train.steps={a.steps}",
        f"train.batch_size={a.batch}", f"train.seq_len={a.seq_len}", f"outer.H={a.H}",
        f"train.eval_every={a.steps}", "train.eval_batches=8", f"train.seed={a.seed}",
        f"data.num_shards={a.sites}", f"train.warmup_steps={max(1, a.steps // 20)}",
        "train.threads=1", "gossip.insecure=true", f"train.log_every={a.steps}",
    ]  # fmt: skip


def _site_cfg(a: argparse.Namespace, index: int):
    from loco.config import compose
    from loco.federation import site_args

    sites = SITES[: a.sites]
    ports = dict.fromkeys(sites, 1)
    ov = common_overrides(a) + ["outer=diloco", "compression=none"]
    return compose(site_args(sites[index], index, sites, ports, ov, None, 1))


def _counting_gloo(timeout: datetime.timedelta):
    from torchft.process_group import ProcessGroupGloo

    class CountingGloo(ProcessGroupGloo):
        """torchft's gloo group that adds up the bytes handed to ``allreduce``."""

        payload = 0

        def allreduce(self, tensors, opts):  # noqa: ANN001, ANN201
            type(self).payload += sum(t.numel() * t.element_size() for t in tensors)
            return super().allreduce(tensors, opts)

    return CountingGloo(timeout=timeout)


def _replica(index: int, a: argparse.Namespace, lighthouse: str, method: str, out: str) -> None:
    from torchft import Manager
    from torchft.local_sgd import DiLoCo, LocalSGD

    from loco import build
    from loco.rank import seed_everything
    from loco.site_comm import SiteComm
    from loco.trainer import lr_schedule

    torch.set_num_threads(1)
    cfg = _site_cfg(a, index)
    seed_everything(cfg.train.seed)
    corpus = build.corpus_from(cfg)
    model = build.model_from(cfg, corpus)
    data = build.data_from(cfg, corpus, SiteComm.single())
    params = list(model.parameters())
    o, t = cfg.optim, cfg.train
    inner = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=t.lr, betas=(o.beta1, o.beta2), eps=o.eps,
    )  # fmt: skip
    timeout = datetime.timedelta(seconds=a.timeout)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = _counting_gloo(timeout)
    # init_sync=False: with torchft's default the first quorum (at step H for DiLoCo) heals every
    # group from group 0, throwing away the other groups' first H steps; here every group starts
    # from the same seeded weights, as loco's sites do
    manager = Manager(
        pg=pg, min_replica_size=a.sites, load_state_dict=model.load_state_dict,
        state_dict=model.state_dict, use_async_quorum=False, replica_id=f"r{index}",
        store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, hostname="127.0.0.1", timeout=timeout,
        quorum_timeout=timeout, connect_timeout=timeout, init_sync=False,
    )  # fmt: skip
    sched = dict(lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
    if method == "diloco":
        oc = cfg.outer
        outer = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov)
        algo = DiLoCo(manager, [model], inner, outer, sync_every=cfg.outer.H)
    else:
        algo = LocalSGD(manager, model, inner, sync_every=cfg.outer.H)
    t0 = time.monotonic()
    with algo:
        for step in range(t.steps):
            for g in inner.param_groups:
                g["lr"] = lr_schedule(step, **sched)
            x, y = data.train_batch(step, 0)
            inner.zero_grad(set_to_none=True)
            model(x, y).backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            inner.step()
    train_s = time.monotonic() - t0
    model.eval()
    with torch.no_grad():
        val = sum(float(model(*data.val_batch(i))) for i in range(t.eval_batches)) / t.eval_batches
    row = {"replica": index, "val_loss": val, "train_s": train_s, "payload": type(pg).payload,
           "manager_step": manager.current_step(), "params": sum(p.numel() for p in params)}  # fmt: skip
    manager.shutdown(wait=False)
    with open(os.path.join(out, f"r{index}.json"), "w") as f:
        json.dump(row, f)


def run_torchft(a: argparse.Namespace, method: str) -> dict:
    """``a.sites`` torchft replica groups running ``method`` (diloco or localsgd)."""
    from torchft._torchft import LighthouseServer

    lh = LighthouseServer(bind="127.0.0.1:0", min_replicas=a.sites)
    ctx = mp.get_context("spawn")
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            procs = [ctx.Process(target=_replica, args=(i, a, lh.address(), method, d))
                     for i in range(a.sites)]  # fmt: skip
            for p in procs:
                p.start()
            for p in procs:
                p.join(a.timeout)
            wall = time.monotonic() - t0
            codes = [p.exitcode for p in procs]
            rows = [json.loads(Path(d, f"r{i}.json").read_text())
                    for i in range(a.sites) if Path(d, f"r{i}.json").exists()]  # fmt: skip
    finally:
        lh.shutdown()
    ok = len(rows) == a.sites and all(c == 0 for c in codes)
    sent = sum(ring_bytes(r["payload"], a.sites) for r in rows)
    return {
        "ok": ok, "exit": codes, "wall_s": round(wall, 1),
        "val_loss": round(sum(r["val_loss"] for r in rows) / max(1, len(rows)), 4),
        "bytes_between_groups": int(sent),
        "allreduce_payload_per_group": rows[0]["payload"] if rows else None,
        "syncs": rows[0]["manager_step"] if rows else None,
        "train_loop_s": round(max(r["train_s"] for r in rows), 1) if rows else None,
        "params": rows[0]["params"] if rows else None,
    }  # fmt: skip


def run_loco(a: argparse.Namespace, extra: list[str], run_dir: Path) -> dict:
    """A real ``loco.local`` federation of the common configuration plus ``extra``."""
    from loco.federation import run_federation

    t0 = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # its tables: stdout is the one JSON line
        out = run_federation(common_overrides(a) + extra, run_dir, timeout=a.timeout)
    wall = time.monotonic() - t0
    rows = out["sites"]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return {
        "ok": all(r.get("exit") == 0 for r in rows) and len(vals) == a.sites,
        "wall_s": round(wall, 1),
        "val_loss": round(sum(vals) / max(1, len(vals)), 4) if vals else None,
        "bytes_between_groups": int(sum(r.get("bytes_sent") or 0 for r in rows)),
        "overrides": extra,
    }


def ratios(loco: dict, peer: dict) -> dict:
    """loco over the peer: validation loss, wall time and bytes."""

    def r(k: str) -> float | None:
        x, y = loco.get(k), peer.get(k)
        return round(x / y, 3) if x and y else None

    return {"val_loss": r("val_loss"), "wall_s": r("wall_s"), "bytes": r("bytes_between_groups")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--H", type=int, default=50)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--runs", type=Path, default=None, help="keep loco's run dirs here")
    a = ap.parse_args()
    if not 2 <= a.sites <= len(SITES) or a.H < 1 or a.steps % a.H:
        print(f"--sites must be 2..{len(SITES)} and --steps a multiple of --H", file=sys.stderr)
        sys.exit(2)
    try:
        import torchft  # noqa: F401
    except ImportError as e:
        print(f"torchft is not installed ({e}): pip install 'loco[peers]'", file=sys.stderr)
        sys.exit(2)

    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        runs = a.runs or Path(d)
        res["torchft_diloco"] = run_torchft(a, "diloco")
        res["torchft_localsgd"] = run_torchft(a, "localsgd")
        res["loco_diloco"] = run_loco(a, ["outer=diloco", "compression=none"], runs / "diloco")
        res["loco_diloco_full"] = run_loco(a, LOCO_DILOCO_FULL, runs / "diloco_full")
        res["loco_noloco"] = run_loco(a, [], runs / "noloco")
        res["loco_localsgd"] = run_loco(a, LOCO_LOCALSGD, runs / "localsgd")
    P = res["torchft_diloco"].get("params") or 0
    line = {
        "bench": "peers_torchft",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "torchft": _version("torchft"),
        "groups": a.sites, "model": a.model, "P": P, "steps": a.steps, "H": a.H,
        "batch": [a.batch, a.seq_len], "seed": a.seed, "transport": "loopback",
        "bytes_method": "torchft: allreduce payload x 2(n-1)/n per group (ring); loco: gossip bytes_sent",
        **res,
        "loco_diloco_over_torchft_diloco": ratios(res["loco_diloco"], res["torchft_diloco"]),
        "loco_diloco_full_over_torchft_diloco": ratios(
            res["loco_diloco_full"], res["torchft_diloco"]
        ),
        "loco_diloco_over_loco_diloco_full": ratios(res["loco_diloco"], res["loco_diloco_full"]),
        "loco_noloco_over_torchft_diloco": ratios(res["loco_noloco"], res["torchft_diloco"]),
        "loco_noloco_over_torchft_localsgd": ratios(res["loco_noloco"], res["torchft_localsgd"]),
        "loco_localsgd_over_torchft_localsgd": ratios(
            res["loco_localsgd"], res["torchft_localsgd"]
        ),
        "fp32_ring_bytes_per_sync": int(a.sites * ring_bytes(4 * P, a.sites)),
        "syncs_expected": a.steps // a.H if a.steps else 0,
        "ok": all(v.get("ok") for v in res.values()),
    }  # fmt: skip
    print(json.dumps(line))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
