"""Where a ZeRO engine's values live, per stage: the compute parameters (the model's trainable
parameters become views into one flat buffer, stages 0-2, or into block units, stage 3), the fp32
masters of the optimizer's range, and the fp32 gradient accumulator (table: ``loco.engine.zero``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loco.engine.experts import ExpertRows, UnitPlan, plan_unit
from loco.engine.flat import FlatLayout
from loco.engine.replica import ReplicaSpace
from loco.engine.stage3 import BlockShards
from loco.site_comm import SiteComm


@dataclass
class Storage:
    flat_param: torch.Tensor | None
    """The compute parameters, full (stages 0-2; None in stage 3)."""
    master: torch.Tensor
    """fp32 masters of the optimizer's range (a view of ``flat_param`` when they coincide)."""
    shards: BlockShards | None
    """Stage 3's block units (None otherwise)."""
    grad: torch.Tensor
    """fp32 gradient: the whole padded vector (stages 0-1) or this rank's shard (2-3, and 1
    with expert rows); laid out by ``space`` at stage 0 with expert rows."""
    initial: torch.Tensor | None = None
    """With ``nvme``: the fp32 masters to write into the tier (``master`` is then the compute
    copy of the range, which the tier's step keeps up to date)."""
    compact: UnitPlan | None = None
    """Stages 0-2 with expert rows: the layout of ``flat_param`` (dense part and own rows)."""
    space: ReplicaSpace | None = None
    """Stage 0 with expert rows: the layout of ``master`` and ``grad`` (``loco.engine.replica``)."""


@torch.no_grad()
def build_storage(model: nn.Module, layout: FlatLayout, comm: SiteComm, *, stage: int,
                  padded: int, opt_range: tuple[int, int], shard: tuple[int, int],
                  compute_dtype: torch.dtype, device: torch.device,
                  offload: bool, prefetch: bool, nvme: bool = False,
                  rows: ExpertRows | None = None,
                  space: ReplicaSpace | None = None) -> Storage:  # fmt: skip
    """Move ``model``'s trainable parameters into the engine's buffers (its parameters become
    views) and make the masters and the gradient. ``opt_range``: the optimizer's global range;
    ``shard``: this rank's. With ``offload`` the masters are in pinned host memory; with
    ``nvme`` they go to the tier (``initial``) and ``master`` is the range's compute copy.
    ``rows``: the expert rows (only this rank's rows of those parameters in its stage-3 units
    or its stage-0/1/2 compute copy, then laid out by ``Storage.compact``); ``space``: stage 0's
    layout of the masters and the gradient with expert rows."""
    full = torch.zeros(padded, dtype=torch.float32)
    for spec, p in zip(layout.specs, layout.params, strict=True):  # no P-sized temporary
        full[spec.offset : spec.end].copy_(p.detach().reshape(-1))
    opt_lo, opt_hi = opt_range
    flat_param: torch.Tensor | None = None
    shards: BlockShards | None = None
    compact = None
    if stage < 3 and rows is not None:
        compact = plan_unit(layout, list(range(len(layout.specs))), rows, comm.world)
        flat_param = torch.empty(compact.size, dtype=compute_dtype, device=device)
        for i, p in enumerate(layout.params):
            (lo, hi), at = rows.kept(i), compact.pos[i]
            flat_param[at : at + hi - lo].copy_(full[lo:hi])
            p.data = flat_param[at : at + hi - lo].view(rows.kept_shape(i))
    elif stage < 3:
        flat_param = full.to(device=device, dtype=compute_dtype)
        for spec, p in zip(layout.specs, layout.params, strict=True):
            p.data = flat_param[spec.offset : spec.end].view(spec.shape)
    initial = full[opt_lo:opt_hi] if nvme else None
    if space is not None:
        master = space.fill(full).to(device)
    elif nvme and flat_param is not None:
        master = flat_param[opt_lo:opt_hi]
    elif nvme:
        master = full[opt_lo:opt_hi].to(device=device, dtype=compute_dtype, copy=True)
    elif stage < 3 and compute_dtype == torch.float32 and not offload and compact is None:
        assert flat_param is not None
        master = flat_param[opt_lo:opt_hi]
    else:
        master = full[opt_lo:opt_hi].clone().to("cpu" if offload else device)
        if offload:
            master = master.pin_memory()
    if stage == 3:
        shards = BlockShards(model, layout, comm, master, shard[0], full, dtype=compute_dtype,
                             device=device, prefetch=prefetch, rows=rows)  # fmt: skip
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(compute_dtype)  # frozen parameters compute in the same dtype
    n = padded if stage < 2 and compact is None else shard[1] - shard[0]
    grad = torch.zeros(space.size if space else n, dtype=torch.float32, device=device)
    return Storage(flat_param, master, shards, grad, initial, compact, space)
