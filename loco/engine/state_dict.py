"""An engine's state dicts, written once over the ``FlatEngine`` seam: this rank's sharded state
(masters and optimizer state on its ``flat_range``, frozen parameters, buffers), its loading,
and the full ``model.state_dict()`` with fp32 master values."""

from __future__ import annotations

from typing import Any

import torch

from loco.engine.base import FlatEngine


@torch.no_grad()
def full_state_dict(engine: FlatEngine) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with fp32 master values, full on every rank. Collective."""
    flat = engine.gather_full()
    layout = engine.layout
    spec_of = {id(p): s for s, p in zip(layout.specs, layout.params, strict=True)}
    out: dict[str, torch.Tensor] = {}
    for name, t in engine.model.state_dict(keep_vars=True).items():
        s = spec_of.get(id(t))
        out[name] = flat[s.offset : s.end].view(s.shape).clone() if s else t.detach().clone()
    return out


def rank_state_dict(engine: FlatEngine, *, world: int, rank: int) -> dict[str, Any]:
    """This rank's sharded state: masters and optimizer state on ``flat_range``. Local."""
    model = engine.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return {
        "layout_hash": engine.layout.hash,
        "numel": engine.numel,
        "world": world,
        "rank": rank,
        "range": engine.flat_range,
        "master": engine.master_range().detach().cpu().clone(),
        "optim": {k: v.cpu().clone() for k, v in engine.optim_state_range().items()},
        "step": engine.optim_step,
        "frozen": frozen,
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
    }


@torch.no_grad()
def load_rank_state_dict(engine: FlatEngine, state: dict[str, Any]) -> None:
    """Load a :func:`rank_state_dict` saved by the same rank of a same-layout group: refuse
    another layout or range, then write the ranges, the step, frozen parameters and buffers
    and ``sync_params(optim_state=True)``. Collective."""
    if state["layout_hash"] != engine.layout.hash:
        raise ValueError(
            f"checkpoint layout {state['layout_hash']} differs from this model's "
            f"{engine.layout.hash}; build the same model architecture"
        )
    if tuple(state["range"]) != tuple(engine.flat_range):
        raise ValueError(
            f"checkpoint range {tuple(state['range'])} is not this rank's range "
            f"{engine.flat_range}; resume with the same world size or reshard through "
            "master_range()/optim_state_range()"
        )
    engine.master_range().copy_(state["master"])
    for k, v in engine.optim_state_range().items():
        v.copy_(state["optim"][k])
    engine.optim_step = state["step"]
    params = dict(engine.model.named_parameters())
    for n, t in state.get("frozen", {}).items():
        params[n].data.copy_(t)
    bufs = dict(engine.model.named_buffers())
    for n, t in state.get("buffers", {}).items():
        bufs[n].copy_(t)
    engine.sync_params(optim_state=True)
