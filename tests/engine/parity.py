"""Shared parity harness: ZeroEngine on a real gloo group vs single-process PlainEngine.

Tolerances (fp32 runs). Both sides compute the same global-batch mean gradient, but in a
different order: the reference reduces over all B sequences inside one cross-entropy, while N
ranks reduce B/N sequences each and then SUM over ranks and divide by N. Those reorderings
change results by a few ulps (~1e-7 relative). Over 5 SGD steps the error stays at that level,
so losses and norms are compared with rtol 1e-5 and parameters with atol 1e-6. AdamW divides by
sqrt(v): for elements whose gradient is pure rounding noise the update is lr * (noise/|noise|),
so a few-ulp gradient difference can move a parameter by a visible fraction of lr. With lr 1e-2
we observe at most ~3e-6, so AdamW parameters use atol 2e-5 (still 500x below one lr-sized
step, so a wrong scale, a dropped bucket or a stale shard fails at once). bf16 runs compare to
the fp32 reference within bf16's precision: 8 mantissa bits give ~4e-3 relative error per
rounding; losses use rtol 2e-3 and parameters atol 2e-3 after 5 steps (lr 5e-2 SGD steps of
~1e-2 per element, so a missing update would still fail).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from loco.engine.flat import FlatLayout
from loco.engine.zero import ZeroEngine
from tests.engine.dist_utils import batches, tiny_gpt
from tests.engine.plain import PlainEngine

STEPS, BATCH = 5, 12
LR = {"sgd": 5e-2, "adamw": 1e-2}
REF_KEYS = ("optim", "grad_clip", "frozen", "weight_decay", "device")


def train(engine: Any, rank: int, world: int, accum: int, lr: float) -> tuple[list, list]:
    """Run STEPS steps on this rank's slice of each global batch; return mean losses, norms."""
    losses, norms = [], []
    device = next(engine.model.parameters()).device
    for x in batches(STEPS, BATCH):
        x = x.to(device)
        b = x.shape[0] // world
        mine = x[rank * b : (rank + 1) * b]
        mb = b // accum
        total = torch.zeros(())
        for k in range(accum):
            xb = mine[k * mb : (k + 1) * mb]
            loss = engine.model(xb[:, :-1], xb[:, 1:]) / accum
            engine.backward(loss)
            total += loss.detach().float().cpu()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
        norms.append(engine.step(lr))
    return losses, norms


def build(cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The tiny model of ``cfg`` (on ``cfg["device"]``, default CPU) and the engine keywords."""
    model = tiny_gpt().to(cfg.get("device", "cpu"))
    if cfg.get("frozen"):
        model.wpe.weight.requires_grad_(False)
    kw = {k: v for k, v in cfg.items() if k not in ("frozen", "device")}
    return model, kw


def reference(cfg: dict) -> tuple[list, list, torch.Tensor]:
    """Single-process PlainEngine on the whole global batch (no process group), on the
    config's device."""
    assert not dist.is_initialized()
    model, _ = build({k: cfg[k] for k in REF_KEYS if k in cfg})
    optim = cfg.get("optim", "adamw")
    eng = PlainEngine(
        model,
        optim=optim,
        grad_clip=cfg.get("grad_clip", 0.0),
        weight_decay=cfg.get("weight_decay", 0.0),
    )
    losses, norms = train(eng, 0, 1, 1, LR[optim])
    return losses, norms, FlatLayout(model).flatten().cpu()


def tolerances(cfg: dict) -> dict[str, float]:
    if cfg.get("compute_dtype") == "bf16":
        return {"loss_rtol": 2e-3, "param_atol": 2e-3}
    atol = 2e-5 if cfg.get("optim", "adamw") == "adamw" else 1e-6
    return {"loss_rtol": 1e-5, "param_atol": atol}


def check_configs(rank: int, world: int, cfgs: list[dict], refs: list[tuple]) -> None:
    """Run every config on this group; rank 0 collects mismatches and fails once at the end."""
    failures = []
    for cfg, (ref_l, ref_n, ref_p) in zip(cfgs, refs, strict=True):
        model, kw = build(cfg)
        eng = ZeroEngine(model, **kw)
        losses, norms = train(
            eng, rank, world, cfg.get("grad_accum", 1), LR[kw.get("optim", "adamw")]
        )
        full = eng.gather_full()
        eng.close()
        if rank != 0:
            continue
        tol = tolerances(cfg)
        try:
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(ref_l), rtol=tol["loss_rtol"], atol=0
            )
            torch.testing.assert_close(
                torch.tensor(norms), torch.tensor(ref_n), rtol=tol["loss_rtol"] * 5, atol=1e-6
            )
            torch.testing.assert_close(full, ref_p, rtol=0, atol=tol["param_atol"])
        except AssertionError as e:
            failures.append(f"world={world} {cfg}: {e}")
    if failures:
        raise AssertionError("\n\n".join(failures))
