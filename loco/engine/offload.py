"""ZeRO-Offload's optimizer step (arXiv 2101.06840): fp32 masters and optimizer state in pinned
host memory, the step on the CPU, pipelined in parts so the copies overlap the update; and the
NVMe tier's step (ZeRO-Infinity, arXiv 2104.07857), streamed from files the same way."""

from __future__ import annotations

import time
from typing import Any

import torch

from loco.engine.tier import NvmeTier, ParamFile

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


class TierStep:
    """The optimizer step of an engine whose fp32 masters and moments live in an NVMe tier.

    Args:
        optimizer: the flat optimizer, built ``tiered`` (no state in memory).
        tier: the tier holding ``master`` and the optimizer's moments of its range.
        compute: the compute parameters of the range (any device, the compute dtype): after a
            step, and after :meth:`commit`, they hold the new masters. None: they are the
            tier's ``param`` stream (stage 3 with the parameters on the tier), written with the
            masters, and ``params`` is the ``ParamFile`` the gathers read them through.

    :meth:`run` streams the parts: part k+1 is read and part k-1 written while part k is
    updated, with the optimizer's own kernel on each part (the same bits as the step on the
    whole range in memory). The range API works on staged copies: :meth:`staged` loads a
    stream, :meth:`commit` writes staged streams back (``sync_params``), a step drops them.
    """

    def __init__(self, *, optimizer: Any, tier: Any, compute: torch.Tensor | None,
                 params: Any = None) -> None:  # fmt: skip
        self.optimizer, self.tier, self.compute, self.params = optimizer, tier, compute, params
        self._read = ("master", *optimizer.state_names)
        self._staged: dict[str, torch.Tensor] = {}
        self.blocked_s = self.step_s = 0.0
        self.steps = 0

    @torch.no_grad()
    def run(self, grad: torch.Tensor, lr: float) -> None:
        """Update the tier's masters and moments from ``grad`` (the range's averaged, clipped
        gradient) and copy the new masters into ``compute``."""
        self._staged.clear()
        if self.params is not None:
            self.params.reset()
        t0 = time.perf_counter()
        tier, n = self.tier, len(self.tier.parts)
        slots = len(tier.slots)
        reads: dict[int, list[int]] = {0: tier.read(0, 0, self._read)} if n else {}
        writes: dict[int, list[int]] = {}
        for k in range(n):
            self._block(tier, reads.pop(k))
            if k + 1 < n:
                self._block(tier, writes.pop(k + 1 - slots, []))  # the slot part k+1 reuses
                reads[k + 1] = tier.read(k + 1, (k + 1) % slots, self._read)
            a, b = tier.parts[k]
            bufs = tier.buffers(k, k % slots)
            g = grad[a:b] if grad.device.type == "cpu" else grad[a:b].cpu()
            state = {name: bufs[name] for name in self.optimizer.state_names}
            self.optimizer.step_window(bufs["master"], g, state, lr, (a, b), count=k == 0)
            if self.compute is not None:
                self.compute[a:b].copy_(bufs["master"])
            else:
                bufs["param"].copy_(bufs["master"])
            writes[k] = tier.write(k, k % slots)
        for reqs in writes.values():
            self._block(tier, reqs)
        self.step_s += time.perf_counter() - t0
        self.steps += 1

    def _block(self, tier: Any, requests: list[int]) -> None:
        t0 = time.perf_counter()
        tier.wait(requests)
        self.blocked_s += time.perf_counter() - t0

    def staged(self, name: str) -> torch.Tensor:
        """Stream ``name`` of the whole range, loaded once until the next step or commit."""
        if name not in self._staged:
            self._staged[name] = self.tier.load(name)
        return self._staged[name]

    @torch.no_grad()
    def commit(self, optim_state: bool) -> None:
        """Write the staged master (and, with ``optim_state``, the staged moments) back to the
        tier and the master into ``compute``; forget every staged copy."""
        staged, self._staged = self._staged, {}
        if self.params is not None:
            self.params.reset()
        if "master" in staged:
            self.tier.store("master", staged["master"])
            if self.compute is not None:
                self.compute.copy_(staged["master"])
            else:
                self.tier.store("param", staged["master"])
        if optim_state:
            for name in self.optimizer.state_names:
                if name in staged:
                    self.tier.store(name, staged[name])

    def close(self) -> None:
        self._staged.clear()
        self.tier.close()


def build_tier_step(*, optimizer: Any, directory: str, part_mb: float, initial: torch.Tensor,
                    compute: torch.Tensor, rank: int, shards: Any = None, lo: int = 0,
                    compute_dtype: torch.dtype = torch.float32,
                    offload_params: str = "none") -> TierStep:  # fmt: skip
    """The NVMe tier of ``optimizer``'s range with its master stream set to ``initial`` (the
    moments start at zero: the files are created empty), and its step. With
    ``offload_params=nvme`` (stage 3: ``shards`` is the engine's ``BlockShards``, ``lo`` its
    shard's first index) the ``param`` stream holds the shard in ``compute_dtype`` and the
    gathers read it through a ``ParamFile`` (``TierStep.params``) instead of ``compute``."""
    if part_mb <= 0:
        raise ValueError(f"zero.nvme_part_mb={part_mb} must be > 0")
    if offload_params not in ("none", "nvme"):
        raise ValueError(f"zero.offload_params={offload_params!r}; choose none or nvme")
    if offload_params == "nvme" and shards is None:
        raise ValueError("zero.offload_params=nvme needs zero.stage=3 (stages 0-2 keep full "
                         "compute parameters on every rank)")  # fmt: skip
    names = dict.fromkeys(("master", *optimizer.state_names), torch.float32)
    if offload_params == "nvme":
        names["param"] = compute_dtype
    tier = NvmeTier(directory=directory, numel=optimizer.hi - optimizer.lo, names=names,
                    part_numel=max(1, int(part_mb * 2**18)), tag=f"r{rank}")  # fmt: skip
    tier.store("master", initial)
    if offload_params == "none":
        return TierStep(optimizer=optimizer, tier=tier, compute=compute)
    tier.store("param", initial)
    own = [[(s - lo, t - lo) for r, _, _, s, t in u.pieces if r == rank] for u in shards.units]
    shards.master = ParamFile(tier, own)
    return TierStep(optimizer=optimizer, tier=tier, compute=None, params=shards.master)
