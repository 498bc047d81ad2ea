"""Differentiable collectives of the mixture-of-experts layers, over a ``SiteComm``.

- :func:`all_to_all`: rank i's chunk j goes to rank j (equal chunks along dim 0). Its backward
  is the same exchange of the gradient (the exchange is its own transpose).
- :func:`all_reduce_sum`: the SUM over the ranks. Its backward is the SUM of the gradients, so
  a statistic computed over the site's whole batch (the load-balancing loss) gets, on every
  rank, the gradient of the site-wide objective.

With one rank both are the identity. Every rank of the group must make the same calls in the
same order (forward and backward are symmetric: the layers run the same ops on every rank).
"""

from __future__ import annotations

from typing import Any

import torch

from loco.site_comm import SiteComm


def _exchange(comm: SiteComm, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    work = comm.all_to_all(out, x)
    if work is not None:
        work.wait()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: SiteComm) -> torch.Tensor:
        ctx.comm = comm
        return _exchange(comm, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(ctx.comm, grad), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: SiteComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.sum_tensor(x.detach().clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.sum_tensor(grad.detach().clone()), None


def all_to_all(x: torch.Tensor, comm: SiteComm) -> torch.Tensor:
    """``x`` (ranks * n, ...) split in ``comm.world`` equal chunks along dim 0; chunk j goes to
    rank j, and the result's chunk i came from rank i."""
    if not comm.multi:
        return x
    if x.shape[0] % comm.world:
        raise ValueError(f"all_to_all: {x.shape[0]} rows do not split over {comm.world} ranks")
    return _AllToAll.apply(x, comm)


def all_reduce_sum(x: torch.Tensor, comm: SiteComm) -> torch.Tensor:
    """The element-wise SUM of ``x`` over the ranks (differentiable)."""
    if not comm.multi:
        return x
    return _AllReduceSum.apply(x, comm)
