"""``loco.worker``'s preflight: a configuration this machine cannot run is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loco.config import ConfigError, compose
from loco.worker import preflight
from tests.workers import ROOT

GPU_SITE = ["+site=eu", "site.device=cuda", "site.nproc=2"]


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_offload_at_stage_0_on_a_multi_gpu_site_is_refused_naming_stage_1(offload, tmp_path):
    """Stage 0 all-gathers its host masters, which NCCL cannot take: refused before any GPU
    is looked for, naming the fix."""
    cfg = compose([*GPU_SITE, "zero.stage=0", f"zero.offload={offload}",
                   f"zero.nvme_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"zero.stage=0 on a 2-GPU site: use zero.stage=1"):
        preflight(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        [*GPU_SITE, "zero.stage=1", "zero.offload=cpu"],  # sharded: the host step is per shard
        [*GPU_SITE, "zero.stage=0", "zero.offload=false"],
        ["+site=eu", "site.device=cuda", "site.nproc=1", "zero.stage=0", "zero.offload=cpu"],
        ["+site=eu", "site.device=cpu", "site.nproc=2", "zero.stage=0", "zero.offload=cpu"],
    ],
)
def test_the_other_offload_settings_pass_the_offload_check(overrides):
    cfg = compose(overrides)
    try:
        preflight(cfg)
    except ConfigError as e:  # on a machine without enough GPUs, the device check speaks
        assert "zero.offload" not in str(e) and ("GPU" in str(e) or "CUDA" in str(e)), e


def test_the_worker_exits_2_with_one_line():
    p = subprocess.run(
        [sys.executable, "-m", "loco.worker", *GPU_SITE, "zero.stage=0", "zero.offload=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "use zero.stage=1" in p.stderr


def test_the_engine_refuses_stage_0_offload_over_nccl_with_several_ranks():
    """The same rule for a ZeroEngine built directly (benchmarks, library use): only the
    combination NCCL cannot run is refused."""
    from loco.engine.options import check_offload_backend

    for mode in ("cpu", "nvme"):
        with pytest.raises(ValueError, match="use stage 1"):
            check_offload_backend(mode, 0, "nccl", 2)
    for args in [("none", 0, "nccl", 8), ("cpu", 1, "nccl", 8), ("cpu", 0, "gloo", 8),
                 ("cpu", 0, "nccl", 1), ("nvme", 3, "nccl", 8)]:  # fmt: skip
        check_offload_backend(*args)


def test_bind_gpu_leaves_a_gloo_or_gpu_less_rank_alone():
    """``bind_gpu`` only ever sets a GPU that exists, under NCCL."""
    import torch

    from loco.launch import bind_gpu

    bind_gpu("gloo", 3)
    bind_gpu("nccl", 10**6)  # no such GPU (or none at all): nothing to bind
    if torch.cuda.is_available():
        bind_gpu("nccl", 0)
        assert torch.cuda.current_device() == 0
