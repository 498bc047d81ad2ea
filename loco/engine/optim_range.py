"""The optimizer's range of a ZeRO engine (the whole padded vector in stage 0, else the rank's
shard): its fp32 masters and optimizer state wherever they live, and the step that updates them.

- device memory (``offload=none``): the flat optimizer updates ``master`` in place;
- pinned host memory (``offload=cpu``, GPU runs): ``offload.HostStep`` updates on the CPU and
  uploads the new values;
- the NVMe tier (``offload=nvme``): ``offload.TierStep`` streams the step through the tier's
  files; the range API then reads and writes staged copies, which :meth:`OptimRange.commit`
  writes back.
"""

from __future__ import annotations

from typing import Any

import torch

from loco.engine.base import OptimOptions
from loco.engine.flat import FlatLayout
from loco.engine.flat_optim import build_flat_optimizer
from loco.engine.offload import HostStep, TierStep, build_tier_step
from loco.engine.storage import Storage


class OptimRange:
    """The masters and optimizer state of one optimizer range, and their step.

    Args:
        optimizer: the flat optimizer of the range (built ``tiered`` with a ``tier_step``).
        master: the fp32 masters (device or pinned host memory); with a ``tier_step``, the
            range's compute copy, or stage 3's ``ParamFile`` when the parameters are on the tier.
        host_step: ZeRO-Offload's step (``offload=cpu``), or None.
        tier_step: the NVMe tier's step (``offload=nvme``), or None.
    """

    def __init__(self, *, optimizer: Any, master: Any, host_step: HostStep | None = None,
                 tier_step: TierStep | None = None) -> None:  # fmt: skip
        self.optimizer, self.master = optimizer, master
        self.host_step, self.tier_step = host_step, tier_step

    def masters(self) -> torch.Tensor:
        """The fp32 masters of the whole range, writable (staged from the tier with ``nvme``)."""
        return self.tier_step.staged("master") if self.tier_step else self.master

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer state of the whole range (staged from the tier with ``nvme``)."""
        if self.tier_step is None:
            return self.optimizer.state
        return {k: self.tier_step.staged(k) for k in self.optimizer.state_names}

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: float, up: torch.Tensor | None) -> bool:
        """Update the range from ``grad`` (averaged and clipped). ``up``: the compute parameters
        of the range (None in stage 3). Return True when the step already wrote the new values
        into ``up`` (the host step uploads them itself)."""
        if self.host_step is not None:
            self.host_step.run(grad, lr, up)
            return up is not None
        if self.tier_step is not None:
            self.tier_step.run(grad, lr)  # writes the new masters into the compute copy
        else:
            self.optimizer.step(self.master, grad, lr)
        return False

    def commit(self, optim_state: bool) -> None:
        """After writes through :meth:`masters` (and, with ``optim_state``, :meth:`state`):
        with ``nvme``, write the staged copies to the tier and the masters into the compute
        copy; nothing to do otherwise (the writes were in place)."""
        if self.tier_step is not None:
            self.tier_step.commit(optim_state)

    def close(self) -> None:
        """Drop the tier (its files are scratch)."""
        if self.tier_step is not None:
            self.tier_step.close()


def build_optim_range(*, optim: str, options: OptimOptions, layout: FlatLayout,
                      opt_range: tuple[int, int], storage: Storage, device: torch.device,
                      opt_device: torch.device, offload: bool, nvme_dir: str,
                      nvme_part_mb: float, offload_params: str, rank: int, lo: int,
                      compute_dtype: torch.dtype) -> OptimRange:  # fmt: skip
    """The flat optimizer ``optim`` on ``opt_range`` (its state on ``opt_device``, pinned with
    ``offload``; with ``storage.space``, the positions ``[0, space.size)`` of stage 0's
    buffers) over ``storage``'s masters, with ZeRO-Offload's host step (``offload``) or,
    when ``storage`` holds the tier's ``initial`` masters, the NVMe tier's step (``nvme_dir``,
    ``nvme_part_mb``, ``offload_params``; ``rank`` and its shard's first index ``lo`` name
    stage 3's own pieces)."""
    opt_lo, opt_hi = opt_range
    space = storage.space  # stage 0 with expert rows: the range is its buffers' positions
    runs = space.runs() if space is not None else layout.decay_runs((opt_lo, opt_hi))
    optimizer = build_flat_optimizer(
        optim, opt_lo, opt_hi, runs, **options.kwargs(),
        device=opt_device, pin_memory=offload, tiered=storage.initial is not None,
    )  # fmt: skip
    master, host_step, tier_step = storage.master, None, None
    if storage.initial is not None:
        tier_step = build_tier_step(
            optimizer=optimizer, directory=nvme_dir, part_mb=nvme_part_mb,
            initial=storage.initial, compute=storage.master, rank=rank, shards=storage.shards,
            lo=lo, compute_dtype=compute_dtype, offload_params=offload_params,
        )  # fmt: skip
        if tier_step.params is not None:
            master = tier_step.params  # stage 3's shard left memory for the tier
    elif offload_params != "none":
        raise ValueError(f"zero.offload_params={offload_params!r} needs zero.offload=nvme")
    if offload:
        host_step = HostStep(optimizer=optimizer, master=master, device=device)
    return OptimRange(optimizer=optimizer, master=master, host_step=host_step,
                      tier_step=tier_step)  # fmt: skip
