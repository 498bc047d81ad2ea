"""Optimizers over one contiguous range of the flat parameter space.

They reproduce ``base.build_optimizer`` (torch ``AdamW`` / ``SGD`` over ``base.param_groups``)
element for element: weight decay applies to the runs of matrix/embedding parameters only, and
the arithmetic is torch's own (``torch._fused_adamw_``, the kernel behind
``AdamW(fused=True)``, when this build has it for the device; otherwise the same formula with
foreach ops). State tensors are flat and cover exactly the range, so a rank's optimizer state is
addressed by the same global indices as its master weights.
"""

from __future__ import annotations

from typing import Any

import torch


def _has_fused_adamw(device: torch.device) -> bool:
    return hasattr(torch, "_fused_adamw_") and device.type in ("cpu", "cuda")


class FlatOptimizer:
    """Base class: an optimizer over ``[lo, hi)`` with per-run weight decay.

    Args:
        lo: first global index of the range.
        hi: one past the last global index.
        runs: ``(lo, hi, decay)`` runs of real parameters inside the range (global indices);
            elements outside every run (padding) are never touched.
        weight_decay: the decay of the ``decay`` runs; the others get none.
        device: where the state lives.
        pin_memory: the state in page-locked host memory.
        tiered: hold no state: it lives in files (``loco.engine.tier``) and every step is
            :meth:`step_window` on buffers the caller brings.
    """

    state_names: tuple[str, ...] = ()

    def __init__(
        self,
        lo: int,
        hi: int,
        runs: list[tuple[int, int, bool]],
        *,
        weight_decay: float,
        device: torch.device,
        pin_memory: bool = False,
        tiered: bool = False,
    ) -> None:
        self.lo, self.hi = lo, hi
        self.weight_decay = weight_decay
        self.step_count = 0
        rel = [(a - lo, b - lo, d) for a, b, d in runs]
        self.spans = {
            True: [(a, b) for a, b, d in rel if d],
            False: [(a, b) for a, b, d in rel if not d],
        }
        self.state: dict[str, torch.Tensor] = {
            name: torch.zeros(hi - lo, dtype=torch.float32, device=device, pin_memory=pin_memory)
            for name in (() if tiered else self.state_names)
        }

    def _views(
        self, flat: torch.Tensor, decay: bool, part: tuple[int, int] | None = None, base: int = 0
    ) -> list[torch.Tensor]:
        """Views of the ``decay`` runs inside ``part``; ``flat[0]`` is range index ``base``."""
        if part is None:
            return [flat[a:b] for a, b in self.spans[decay]]
        lo, hi = part
        return [
            flat[max(a, lo) - base : min(b, hi) - base]
            for a, b in self.spans[decay]
            if a < hi and b > lo
        ]

    @torch.no_grad()
    def step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
        part: tuple[int, int] | None = None,
        count: bool = True,
    ) -> None:
        """Update ``param`` (fp32, length hi - lo) in place from ``grad`` (fp32, same length).

        ``part``: only ``[a, b)`` of the range (relative to ``lo``); a step done in parts
        counts once (``count=True`` on one part only, before the others) and equals the whole
        step (bitwise on the foreach paths; the fused AdamW kernel may differ by ulps at cuts)."""
        if count:
            self.step_count += 1
        for decay in (True, False):
            ps = self._views(param, decay, part)
            if ps:
                state = {k: self._views(v, decay, part) for k, v in self.state.items()}
                self._update(ps, self._views(grad, decay, part), state, decay=decay, lr=lr)

    @torch.no_grad()
    def step_window(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        lr: float,
        window: tuple[int, int],
        count: bool,
    ) -> None:
        """:meth:`step` on ``part=window`` where ``param``, ``grad`` and each ``state[name]``
        (every name of ``state_names``) hold only ``[a, b)`` of the range (relative to ``lo``),
        as the tier streams them in: the same kernel calls on the same values, so the same bits."""
        if count:
            self.step_count += 1
        a = window[0]
        for decay in (True, False):
            ps = self._views(param, decay, window, a)
            if ps:
                st = {k: self._views(state[k], decay, window, a) for k in self.state_names}
                self._update(ps, self._views(grad, decay, window, a), st, decay=decay, lr=lr)

    def _update(
        self,
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
        *,
        decay: bool,
        lr: float,
    ) -> None:
        """One step on matching views of the parameters, gradients and state of one decay
        group (``gs`` may be modified)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, **{k: v for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self.state.items():
            if state[k].shape != v.shape:
                raise ValueError(
                    f"optimizer state {k!r} has shape {tuple(state[k].shape)}, this range needs "
                    f"{tuple(v.shape)}; load a checkpoint of the same layout and world size, or "
                    "reshard it through the flat-range API"
                )
            v.copy_(state[k])
        self.step_count = int(state["step"])


class FlatAdamW(FlatOptimizer):
    """AdamW (decoupled weight decay) over a flat range; state ``exp_avg``, ``exp_avg_sq``."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        lo: int,
        hi: int,
        runs: list[tuple[int, int, bool]],
        *,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        device: torch.device,
        pin_memory: bool = False,
        fused: bool | None = None,
        tiered: bool = False,
    ) -> None:
        super().__init__(
            lo, hi, runs, weight_decay=weight_decay, device=device, pin_memory=pin_memory,
            tiered=tiered,
        )  # fmt: skip
        self.betas, self.eps = betas, eps
        self.fused = _has_fused_adamw(torch.device(device)) if fused is None else fused

    def _update(
        self,
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
        *,
        decay: bool,
        lr: float,
    ) -> None:
        ms, vs = state["exp_avg"], state["exp_avg_sq"]
        b1, b2 = self.betas
        wd = self.weight_decay if decay else 0.0
        if self.fused:
            step_t = torch.tensor(float(self.step_count), device=ps[0].device)
            torch._fused_adamw_(
                ps, gs, ms, vs, [], [step_t] * len(ps),
                lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=self.eps,
                amsgrad=False, maximize=False,
            )  # fmt: skip
            return
        # the arithmetic of torch.optim.AdamW(foreach=True)
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
        bc1 = 1 - b1**self.step_count
        bc2_sqrt = (1 - b2**self.step_count) ** 0.5
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, ms, denom, -lr / bc1)


class FlatSGD(FlatOptimizer):
    """SGD with (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``; state ``momentum``."""

    def __init__(
        self,
        lo: int,
        hi: int,
        runs: list[tuple[int, int, bool]],
        *,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        device: torch.device,
        pin_memory: bool = False,
        tiered: bool = False,
    ) -> None:
        self.state_names = ("momentum",) if momentum != 0 else ()
        super().__init__(
            lo, hi, runs, weight_decay=weight_decay, device=device, pin_memory=pin_memory,
            tiered=tiered,
        )  # fmt: skip
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0; set momentum or drop nesterov")
        self.momentum, self.nesterov = momentum, nesterov

    def _update(
        self,
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
        *,
        decay: bool,
        lr: float,
    ) -> None:
        if decay and self.weight_decay != 0:
            torch._foreach_add_(gs, ps, alpha=self.weight_decay)  # grad is ours to modify
        if self.momentum != 0:
            bufs = state["momentum"]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, gs)
            if self.nesterov:
                torch._foreach_add_(gs, bufs, alpha=self.momentum)
            else:
                gs = bufs
        torch._foreach_add_(ps, gs, alpha=-lr)


def build_flat_optimizer(
    name: str,
    lo: int,
    hi: int,
    runs: list[tuple[int, int, bool]],
    *,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float,
    nesterov: bool,
    device: torch.device,
    pin_memory: bool = False,
    tiered: bool = False,
) -> FlatOptimizer:
    """The flat counterpart of ``base.build_optimizer`` (``adamw`` or ``sgd``); ``tiered``:
    no state in memory (see :class:`FlatOptimizer`)."""
    if name == "adamw":
        return FlatAdamW(
            lo, hi, runs, betas=betas, eps=eps, weight_decay=weight_decay,
            device=device, pin_memory=pin_memory, tiered=tiered,
        )  # fmt: skip
    if name == "sgd":
        return FlatSGD(
            lo, hi, runs, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            device=device, pin_memory=pin_memory, tiered=tiered,
        )  # fmt: skip
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")
