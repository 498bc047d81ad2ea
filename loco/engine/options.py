"""Checking a ZeRO engine's options: the stage, step and dtype options and the offload mode,
each refused with one line naming the fix."""

from __future__ import annotations

import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_options(stage: int, grad_accum: int, bucket_mb: float, max_inflight: int,
                  grad_clip: float, compute_dtype: str,
                  reduce_dtype: str) -> tuple[torch.dtype, torch.dtype]:  # fmt: skip
    """Refuse a bad option with one line naming the fix; the compute and reduce dtypes."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero.stage={stage!r}; choose 0, 1, 2 or 3")
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be >= 1")
    if bucket_mb <= 0:
        raise ValueError(f"zero.bucket_mb={bucket_mb} must be > 0")
    if max_inflight < 1:
        raise ValueError(f"zero.max_inflight={max_inflight} must be >= 1")
    if grad_clip < 0:
        raise ValueError(f"grad_clip={grad_clip} must be >= 0 (0 disables clipping)")
    return dtype_of(compute_dtype, "compute_dtype"), dtype_of(reduce_dtype, "reduce_dtype")


OFFLOAD_MODES = {False: "none", True: "cpu", "false": "none", "none": "none", "cpu": "cpu",
                 "true": "cpu", "nvme": "nvme"}  # fmt: skip


def offload_name(offload: bool | str) -> str | None:
    """``none``, ``cpu`` or ``nvme`` for a ``zero.offload`` value; None for an unknown one."""
    return OFFLOAD_MODES.get(offload.lower() if isinstance(offload, str) else offload)


def offload_mode(offload: bool | str, device: torch.device,
                 nvme_dir: str) -> tuple[str, torch.device]:  # fmt: skip
    """``none``, ``cpu`` (GPU runs only: ignored with a warning on a CPU run) or ``nvme``, and
    the device of the optimizer's state (the CPU unless ``none``)."""
    mode = offload_name(offload)
    if mode is None:
        raise ValueError(f"zero.offload={offload!r}; choose false, cpu or nvme")
    if mode == "nvme" and not nvme_dir:
        raise ValueError("zero.offload=nvme needs zero.nvme_dir (a folder on a local NVMe disk)")
    if mode == "cpu" and device.type != "cuda":
        warnings.warn(
            "zero.offload applies to GPU runs only: on a CPU run the master weights and "
            "optimizer state are already in host memory, so offload is ignored",
            stacklevel=3,
        )
        return "none", device
    return mode, torch.device("cpu") if mode != "none" else device


def check_offload_backend(mode: str, stage: int, backend: str, world: int) -> None:
    """Refuse an offload (``mode`` not ``none``) at stage 0 over NCCL with several ranks: stage
    0 all-gathers the replicated host masters after writes to the range API, and NCCL moves
    GPU memory only. Stage 1 shards the same state."""
    if mode != "none" and stage == 0 and backend == "nccl" and world > 1:
        raise ValueError(
            f"zero.offload={mode} at stage 0 over NCCL with {world} ranks: use stage 1 (it "
            "shards the offloaded state) or no offload"
        )


def dtype_of(name: str, key: str) -> torch.dtype:
    """The dtype named ``name`` (``fp32`` or ``bf16``) for the option ``zero.<key>``."""
    if name not in DTYPES:
        raise ValueError(f"zero.{key}={name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
