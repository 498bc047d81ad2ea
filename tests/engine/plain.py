"""Replicated training with plain gradient averaging: the test-only reference engine.

The DDP baseline, no sharding. ``tests/engine/parity.py`` compares ``ZeroEngine`` against it; it
implements the trainer seam (``loco.engine.base.StepEngine``) only, never the flat-state seam.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from loco.engine.base import OptimOptions, build_optimizer


class PlainEngine:
    """Every rank holds the whole model and optimizer; gradients are averaged by all-reduce.

    Communication: one flat all-reduce of all gradients per optimizer step (SUM, then a divide
    by the world size: gloo's AVG has given wrong results). World size 1 does no collective.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optim: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = OptimOptions.weight_decay,
        betas: tuple[float, float] = OptimOptions.betas,
        eps: float = OptimOptions.eps,
        momentum: float = OptimOptions.momentum,
        nesterov: bool = OptimOptions.nesterov,
        grad_clip: float = 0.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model = model
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.grad_clip = grad_clip
        if self.world > 1:
            self._broadcast_params()
        self.optimizer = build_optimizer(
            model,
            name=optim,
            lr=lr,
            **OptimOptions(weight_decay, betas, eps, momentum, nesterov).kwargs(),
        )
        self._params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            dist.broadcast(t.data, src=src, group=self.group)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradients locally (no collective)."""
        loss.backward()

    @torch.no_grad()
    def _average_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world)
        off = 0
        for p in self._params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[off : off + n].view_as(p))
            off += n

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Average (collective when world > 1), clip and apply; return the norm before clipping."""
        if self.world > 1:
            self._average_grads()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.grad_clip, norm)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        """The model's and the torch optimizer's state dicts (references, not copies)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (local)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
