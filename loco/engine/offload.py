"""ZeRO-Offload's optimizer step (arXiv 2101.06840): fp32 masters and optimizer state in pinned
host memory, the step on the CPU, pipelined in parts so the copies overlap the update."""

from __future__ import annotations

from typing import Any

import torch

OFFLOAD_PARTS = 8
"""The offloaded optimizer step runs in up to this many parts, copies overlapped with compute."""
OFFLOAD_MIN_PART = 1 << 20
"""Values per part at least (smaller parts cost more in launches than they hide)."""


class HostStep:
    """The optimizer step of a GPU engine whose masters live in host memory.

    Args:
        optimizer: the flat optimizer (its state in pinned host memory).
        master: the fp32 masters of the optimizer's range (pinned host memory).
        device: the GPU the gradients and compute parameters are on.
    """

    def __init__(self, *, optimizer: Any, master: torch.Tensor, device: torch.device) -> None:
        self.optimizer, self.master, self.device = optimizer, master, device
        self.grad_host = torch.zeros(master.numel(), dtype=torch.float32, pin_memory=True)
        self._copy_stream: Any = None

    @torch.no_grad()
    def run(self, grad: torch.Tensor, lr: float, up: torch.Tensor | None) -> None:
        """Update the masters from ``grad`` (on the GPU, averaged and clipped) and copy the new
        values to ``up`` (the compute parameters of the range; None: stage 3 gathers from the
        masters). Part i+1's gradient comes down and part i-1's weights go up on a copy stream
        while the CPU updates part i: the same update as one piece (elementwise; ulps at the
        cuts with the fused AdamW). The uploads are done before the main stream goes on."""
        n = grad.numel()
        k = max(1, min(OFFLOAD_PARTS, n // OFFLOAD_MIN_PART))
        parts = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        main = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        cs = self._copy_stream
        cs.wait_stream(main)  # the gradient is averaged and clipped
        down = []
        with torch.cuda.stream(cs):
            for a, b in parts:
                self.grad_host[a:b].copy_(grad[a:b], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(cs)
                down.append(ev)
        for i, ((a, b), ev) in enumerate(zip(parts, down, strict=True)):
            ev.synchronize()
            self.optimizer.step(self.master, self.grad_host, lr, part=(a, b), count=i == 0)
            if up is not None:
                with torch.cuda.stream(cs):
                    up[a:b].copy_(self.master[a:b], non_blocking=True)
        main.wait_stream(cs)
