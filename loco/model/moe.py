"""Mixture-of-experts MLP layers (Switch / GShard gating, DeepSpeed-MoE's residual MoE).

A layer routes each of its S tokens to ``k`` of ``E`` experts (each a GELU MLP like the dense
one). Routing runs in fp32: ``probs = softmax(x W_g)``, the top-``k`` experts of each token,
gates = their probabilities (k = 1, Switch) or those renormalised to sum to 1 (k >= 2,
GShard). Each expert takes at most ``capacity = max(min_capacity, ceil(capacity_factor * k *
S / E))`` tokens; places are given first-choice-first, in token order (then second choices);
an assignment past the capacity is **dropped** (that token gets nothing from that expert: the
residual stream carries it). In evaluation no token is dropped (capacity S), so a KV-cached
generation gives the logits of a full forward.

Regularisers, computed over the site's whole batch (statistics summed over its ranks):
- load balancing (Switch eq. 4): ``aux = E * sum_e f_e * P_e``, f_e the fraction of tokens
  whose first choice is e, P_e the mean router probability of e (1.0 when balanced);
- router z-loss (ST-MoE): ``z = mean over tokens of logsumexp(logits)^2``.

Expert parallelism: the experts' weights are stacked ``(E, d, h)`` tensors present on every
rank (the flat parameter space holds the whole model), but with ``ep`` ranks in the expert group
rank j computes only experts ``[j E/ep, (j+1) E/ep)``: the (E, capacity, d) dispatch buffer goes
through an all-to-all, the owner runs its experts on every rank's tokens, and a second
all-to-all brings the outputs back. The other experts' slices get zero gradient on that rank,
so the engine's SUM over the site's ranks yields the full gradient at the owner. At ZeRO stage 3
the engine keeps only a rank's own experts (``MoEGPT.expert_rows``, ``loco.engine.experts``):
the stacked parameters are then ``(E/ep, ...)`` views, which ``Experts`` uses as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loco.model.dispatch import all_reduce_sum, all_to_all
from loco.model.gpt import MLP, GPTConfig
from loco.site_comm import SiteComm


@dataclass
class MoEOptions:
    """The MoE layers' options (``model.moe.*``)."""

    experts: int = 8
    k: int = 1
    capacity_factor: float = 1.25
    min_capacity: int = 4
    aux_coef: float = 0.01
    z_coef: float = 0.001
    residual: bool = False
    every: int = 2  # an MoE MLP in every ``every``-th block (blocks every-1, 2*every-1, ...)
    pyramid: int = 0  # experts of the MoE layers in the model's second half (0: ``experts``)

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"model.moe.experts={self.experts} must be >= 1")
        if not 1 <= self.k <= self.experts:
            raise ValueError(f"model.moe.k={self.k} must be in [1, model.moe.experts]")
        if self.residual and self.k != 1:
            raise ValueError(
                "model.moe.residual=true takes one expert per token: set model.moe.k=1"
            )
        if not self.capacity_factor > 0 or not math.isfinite(self.capacity_factor):
            raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0")
        if self.min_capacity < 1 or self.every < 1:
            raise ValueError("model.moe.min_capacity and model.moe.every must be >= 1")
        if self.aux_coef < 0 or self.z_coef < 0:
            raise ValueError("model.moe.aux_coef and model.moe.z_coef must be >= 0")
        if self.pyramid < 0 or 0 < self.pyramid < self.k:
            raise ValueError(f"model.moe.pyramid={self.pyramid} must be 0 (off) or >= model.moe.k")

    def for_block(self, block: int, n_layer: int) -> MoEOptions:
        """The options of the MoE layer in ``block``: ``pyramid`` experts in the second half."""
        if self.pyramid and block >= n_layer // 2:
            return dataclasses.replace(self, experts=self.pyramid)
        return self

    def capacity(self, tokens: int) -> int:
        """Places per expert for ``tokens`` tokens in training."""
        return max(
            self.min_capacity, math.ceil(self.capacity_factor * self.k * tokens / self.experts)
        )


@dataclass
class Routing:
    """The kept assignments (choice-major order) and the routing's statistics."""

    slot: torch.Tensor  # (n,) expert * capacity + place, into the (E * capacity) buffer
    token: torch.Tensor  # (n,) the token of each kept assignment
    gate: torch.Tensor  # (n,) its gate (fp32, differentiable)
    first: torch.Tensor  # (S,) each token's first choice
    kept: torch.Tensor  # (E,) kept assignments per expert
    dropped: int  # assignments past the capacity


def route(logits: torch.Tensor, k: int, capacity: int) -> Routing:
    """Top-``k`` routing of ``logits`` (S, E) with ``capacity`` places per expert."""
    S, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    gates = top_p if k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    expert = top_i.t().reshape(-1)  # choice-major: every first choice before any second
    place = (F.one_hot(expert, E).cumsum(0) - 1).gather(1, expert[:, None]).squeeze(1)
    keep = (place < capacity).nonzero().squeeze(1)
    token = torch.arange(S, device=logits.device).repeat(k)
    kept_expert = expert[keep]
    return Routing(
        slot=kept_expert * capacity + place[keep],
        token=token[keep],
        gate=gates.t().reshape(-1)[keep],
        first=top_i[:, 0],
        kept=torch.bincount(kept_expert, minlength=E),
        dropped=int(expert.numel() - keep.numel()),
    )


class Experts(nn.Module):
    """E GELU MLPs as stacked weights; ``forward`` runs this rank's share of them."""

    def __init__(self, cfg: GPTConfig, experts: int) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.experts = experts
        self.fc_weight = nn.Parameter(torch.empty(experts, d, h))
        self.proj_weight = nn.Parameter(torch.empty(experts, h, d))
        self.fc_bias = nn.Parameter(torch.zeros(experts, 1, h)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(experts, 1, d)) if cfg.bias else None
        self.comm = SiteComm.single()  # the expert-parallel group (set by ``bind``)

    def bind(self, comm: SiteComm) -> None:
        if self.experts % comm.world:
            raise ValueError(
                f"model.moe.ep={comm.world} does not divide model.moe.experts={self.experts}"
            )
        self.comm = comm

    def rows(self, site_rank: int) -> tuple[int, int]:
        """The experts ``[lo, hi)`` site rank ``site_rank`` computes (its group rank is
        ``site_rank % ep``: the groups are consecutive ranks)."""
        per = self.experts // self.comm.world
        j = site_rank % self.comm.world
        return j * per, (j + 1) * per

    def _slice(self, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        # an engine may hold only this rank's experts (stage 3: ``loco.engine.experts``)
        return w if w.shape[0] == hi - lo < self.experts else w[lo:hi]

    def _mlp(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        h = torch.bmm(x, self._slice(self.fc_weight, lo, hi))
        if self.fc_bias is not None:
            h = h + self._slice(self.fc_bias, lo, hi)
        y = torch.bmm(F.gelu(h, approximate="tanh"), self._slice(self.proj_weight, lo, hi))
        return y + self._slice(self.proj_bias, lo, hi) if self.proj_bias is not None else y

    def forward(self, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` (E, C, d): every expert's places on this rank -> the experts' outputs."""
        ep = self.comm.world
        if ep == 1:
            return self._mlp(buf, 0, self.experts)
        E, C, d = buf.shape
        per = E // ep
        lo = self.comm.rank * per
        recv = all_to_all(buf.reshape(ep * per * C, d), self.comm)  # (rank i, my expert, C)
        x = recv.view(ep, per, C, d).transpose(0, 1).reshape(per, ep * C, d)
        y = self._mlp(x, lo, lo + per)
        send = y.view(per, ep, C, d).transpose(0, 1).reshape(ep * per * C, d)
        return all_to_all(send, self.comm).view(E, C, d)


class MoELayer(nn.Module):
    """The MoE MLP of one block (with ``residual``: a dense MLP mixed with one expert).

    After a training forward, :attr:`regulariser` holds ``aux_coef * aux + z_coef * z``
    (differentiable) and :attr:`tally` accumulates [aux, z, dropped, assignments, forwards,
    kept per expert...] of the site's batch for the metrics.
    """

    def __init__(self, cfg: GPTConfig, opts: MoEOptions) -> None:
        super().__init__()
        self.opts = opts
        self.router = nn.Linear(cfg.d_model, opts.experts, bias=False)
        self.experts = Experts(cfg, opts.experts)
        self.drop = nn.Dropout(cfg.dropout)
        self.dense = MLP(cfg) if opts.residual else None
        self.coef = nn.Linear(cfg.d_model, 2, bias=False) if opts.residual else None
        self.site = SiteComm.single()  # the site's ranks: the regularisers' statistics
        self.regulariser: torch.Tensor | None = None
        self.tally = torch.zeros(5 + opts.experts, dtype=torch.float64)

    def bind(self, site: SiteComm, experts: SiteComm) -> None:
        self.site = site
        self.experts.bind(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        tokens = x.reshape(B * T, d)
        logits = F.linear(tokens.float(), self.router.weight.float())
        cap = self.opts.capacity(B * T) if self.training else B * T
        r = route(logits, self.opts.k, cap)
        E = self.opts.experts
        buf = tokens.new_zeros(E * cap, d).index_copy(0, r.slot, tokens.index_select(0, r.token))
        out = self.experts(buf.view(E, cap, d)).reshape(E * cap, d).index_select(0, r.slot)
        y = tokens.new_zeros(B * T, d).index_add(0, r.token, out * r.gate[:, None].to(out.dtype))
        if self.dense is not None and self.coef is not None:
            c = torch.softmax(F.linear(tokens.float(), self.coef.weight.float()), dim=-1)
            y = y * c[:, :1].to(y.dtype) + self.dense(tokens) * c[:, 1:].to(y.dtype)
        self.regulariser = None
        if self.training and torch.is_grad_enabled():
            self._regularise(logits, r)
        return self.drop(y.view(B, T, d))

    def _regularise(self, logits: torch.Tensor, r: Routing) -> None:
        """The site-wide load-balancing and z losses of this forward, and the tally."""
        S, E = logits.shape
        probs = torch.softmax(logits.float(), dim=-1)
        z = torch.logsumexp(logits.float(), dim=-1).square().sum()
        counts = torch.stack(
            [torch.bincount(r.first, minlength=E).float(), r.kept.float()]
        ).reshape(-1)
        fixed = torch.cat([counts, logits.new_tensor([float(r.dropped), float(S)])])
        stats = torch.cat([probs.sum(dim=0), z[None], fixed.to(probs.device)])
        stats = all_reduce_sum(stats, self.site)
        p_sum, z_sum = stats[:E], stats[E]
        first, kept = stats[E + 1 : 2 * E + 1].detach(), stats[2 * E + 1 : 3 * E + 1].detach()
        dropped, total = stats[3 * E + 1].detach(), stats[3 * E + 2].detach()
        aux = E * (first / total * p_sum / total).sum()
        zl = z_sum / total
        self.regulariser = self.opts.aux_coef * aux + self.opts.z_coef * zl
        fig = torch.stack([aux.detach(), zl.detach(), dropped, total * self.opts.k, total / total])
        row = torch.cat([fig, kept]).double()
        if self.tally.device != row.device:  # kept where the model runs: no sync per forward
            self.tally = self.tally.to(row.device)
        self.tally += row
