"""The engine seams: what the training loop, the outer loop and checkpoints call on an engine.

Two small Protocols, one per seam, name every call their consumers make:

- :class:`StepEngine`, the trainer's seam (``loco.trainer``): run a forward on ``model``, then
  ``backward`` / ``step``.
- :class:`FlatEngine`, the flat-state seam (``loco.outer.flat_view``, ``loco.outer.join``,
  ``loco.checkpoint.state``, ``loco.build``): this rank's range of the fp32 flat parameter
  space, its master weights and optimizer state, and the collectives that publish writes.

:class:`Engine` is both; every production engine (``loco.engine.zero.ZeroEngine``, stages 0-3)
implements it. All three are ``runtime_checkable``; ``tests/engine/test_protocol.py`` checks
every implementation against the seams it claims. "Collective" below means: every rank of the
engine's group calls it, the same number of times, in the same order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from loco.engine.flat import FlatLayout


@runtime_checkable
class StepEngine(Protocol):
    """Owns the model's parameters, gradients and optimizer state on one rank.

    Contract for one optimizer step with ``grad_accum`` micro-batches:
    ``backward(loss_k)`` for k in 1..grad_accum (each ``loss_k`` already divided by
    ``grad_accum`` by the caller), then ``step(lr)``. After ``step`` the gradients of every
    rank of the group have been averaged (a mean over ranks, never a sum), clipped by their
    global norm, applied, and cleared. Every rank calls every method the same number of times.
    """

    @property
    def model(self) -> nn.Module:
        """The module to run forward on (every rank); its parameters are the engine's."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss. Collective (on the micro-batches that reduce)."""
        ...

    def step(self, lr: float) -> float:
        """Apply one update at ``lr``; return the global gradient norm before clipping (the same
        on every rank). Collective."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the weights and optimizer state it holds. Local."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what ``state_dict`` returned on the same rank of a same-shaped group; the
        model then computes with it. Collective."""
        ...


@runtime_checkable
class FlatEngine(Protocol):
    """This rank's view of the flat parameter space (``loco.engine.flat.FlatLayout``).

    The padded flat vector (length ``padded``) is split into one shard ``[lo, hi)`` per rank;
    ``flat_range`` is the shard clipped to the ``numel`` real values (empty on a trailing rank
    whose shard is all padding). ``master_range`` and ``optim_state_range`` are addressed by
    that range, whatever the ZeRO stage. Writes to them reach the compute parameters (and the
    other ranks) only through ``sync_params``.
    """

    @property
    def model(self) -> nn.Module:
        """The module whose trainable parameters the layout flattens (same on every rank)."""
        ...

    @property
    def layout(self) -> FlatLayout:
        """The flat layout of ``model``'s trainable parameters (same on every rank)."""
        ...

    @property
    def layout_hash(self) -> str:
        """``layout.hash``: equal on two engines iff their flat spaces line up."""
        ...

    @property
    def numel(self) -> int:
        """P, the number of real values of the flat vector."""
        ...

    @property
    def padded(self) -> int:
        """The padded length of the flat vector (``numel`` rounded up; every shard equal)."""
        ...

    @property
    def lo(self) -> int:
        """First index of this rank's shard of the padded vector."""
        ...

    @property
    def hi(self) -> int:
        """One past the last index of this rank's shard (``hi - lo`` equal on every rank)."""
        ...

    @property
    def flat_range(self) -> tuple[int, int]:
        """This rank's owned range ``(lo, min(hi, numel))`` clipped to P; may be empty."""
        ...

    optim_step: int
    """The optimizer's step count (read and write; the same on every rank)."""

    def master_range(self) -> torch.Tensor:
        """A writable fp32 view of the master weights on ``flat_range``. Local; after writing,
        call ``sync_params`` on every rank."""
        ...

    def optim_state_range(self) -> dict[str, torch.Tensor]:
        """Writable fp32 views of the optimizer state on ``flat_range`` by name (``exp_avg``,
        ``exp_avg_sq`` for AdamW, ``momentum`` for SGD; an empty dict when the optimizer keeps
        none). Local; the same names on every rank."""
        ...

    def sync_params(self, optim_state: bool = False) -> None:
        """Propagate writes to ``master_range`` (and, with ``optim_state``, to the optimizer
        state) to the compute parameters of every rank. Collective."""
        ...

    def gather_full(self) -> torch.Tensor:
        """The full fp32 master vector (length ``numel``) on every rank, on the CPU. Collective."""
        ...


@runtime_checkable
class Engine(StepEngine, FlatEngine, Protocol):
    """Both seams: what a site builds (``loco.build.engine_from``) and hands to its consumers."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings (dim >= 2); never norms or biases (dim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class OptimOptions:
    """The inner optimizer's keyword arguments with their defaults, declared once.

    :func:`build_optimizer`, ``flat_optim.build_flat_optimizer`` and
    ``loco.engine.zero.ZeroEngine`` take these keywords (their defaults read this class);
    ``loco.build`` fills one from ``optim.*`` and passes ``kwargs()`` on. ``adamw`` uses
    ``betas``/``eps``, ``sgd`` ``momentum``/``nesterov``; both ``weight_decay``.
    """

    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments."""
        return asdict(self)


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float = OptimOptions.weight_decay,
    betas: tuple[float, float] = OptimOptions.betas,
    eps: float = OptimOptions.eps,
    momentum: float = OptimOptions.momentum,
    nesterov: bool = OptimOptions.nesterov,
) -> torch.optim.Optimizer:
    """The torch optimizer that defines loco's inner-step semantics (``adamw`` or ``sgd``)."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")
