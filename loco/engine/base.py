"""The engine seam: what the training loop needs from a (possibly sharded) engine."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Engine(Protocol):
    """Owns the model's parameters, gradients and optimizer state on one rank.

    Contract for one optimizer step with ``grad_accum`` micro-batches:
    ``backward(loss_k)`` for k in 1..grad_accum (each ``loss_k`` already divided by
    ``grad_accum`` by the caller), then ``step(lr)``. After ``step`` the gradients of every
    rank of the group have been averaged (a mean over ranks, never a sum), clipped by their
    global norm, applied, and cleared. Every rank calls every method the same number of times.
    """

    model: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> float:
        """Apply one update; return the global gradient norm before clipping."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings (dim >= 2); never norms or biases (dim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """The torch optimizer that defines loco's inner-step semantics (``adamw`` or ``sgd``)."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")
