"""The engine on a GPU: NCCL world 1, gloo with CUDA tensors, CPU offload (skipped without CUDA).

Run on a GPU machine with ``pytest -m "not slow" tests/engine/test_cuda.py`` (about a minute
on one GPU). Only ``loco.engine``, ``loco.model`` and ``tests.engine`` are imported: the GPU
machine needs torch, numpy and pytest, no Hydra. Each check takes its device as a parameter;
the ``cpu`` variants run the same code paths on gloo (to debug them without a GPU) and are
slow tests, since the default CPU parity tests already cover them.

- A world-1 NCCL group runs the engine's code without any collective (a group of one rank
  needs none), so the collectives on CUDA tensors are checked with two ranks on gloo sharing
  the GPU: gloo implements broadcast, all_reduce, reduce and all_gather for CUDA tensors
  (staged through host memory), which are all the engine uses.
- Offload keeps the fp32 masters and AdamW state in pinned host memory and runs the step on the
  CPU; it must give the non-offload results (the CPU and CUDA fused AdamW kernels differ by a
  few ulps per step, hence the AdamW tolerance of ``parity.py``) and its CPU step must be as
  fast as ``torch.optim.AdamW(fused=True)`` on the CPU.

Tolerances are those of ``tests/engine/parity.py`` (same reasoning: the references run on the
same device, so only the reduction order differs).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from loco.engine.flat import FlatLayout
from loco.engine.zero import ZeroEngine
from loco.model.gpt import GPT, GPTConfig
from tests.engine.dist_utils import run_ranks, tiny_gpt
from tests.engine.parity import LR, check_configs, reference, tolerances, train

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    pytest.param("cpu", marks=pytest.mark.slow),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

ADAMW = dict(optim="adamw", grad_clip=0.3, weight_decay=0.1)


def _world1_configs(device: str) -> list[dict]:
    return [
        *(dict(stage=s, device=device, bucket_mb=0.001, **ADAMW) for s in range(4)),
        dict(stage=3, device=device, optim="sgd", grad_accum=2, activation_checkpointing=True),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_world1_group_matches_plain(device: str) -> None:
    """Stages 0-3 in a one-rank NCCL (GPU) / gloo (CPU) group == PlainEngine on the device."""
    cfgs = _world1_configs(device)
    refs = [reference(c) for c in cfgs]
    run_ranks(check_configs, 1, cfgs, refs, backend="nccl" if device == "cuda" else "gloo")


def _two_rank_configs(device: str) -> list[dict]:
    return [
        *(dict(stage=s, device=device, optim="sgd", bucket_mb=0.001) for s in range(4)),
        *(dict(stage=s, device=device, collective="allreduce", **ADAMW) for s in range(4)),
        dict(stage=2, device=device, optim="sgd", grad_accum=2, frozen=True),
        dict(stage=3, device=device, optim="sgd", compute_dtype="bf16", reduce_dtype="bf16"),
        dict(stage=3, device=device, activation_checkpointing=True, **ADAMW),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_gloo_device_tensors(device: str) -> None:
    """Two gloo ranks whose tensors live on ``device`` (both on GPU 0) == PlainEngine."""
    cfgs = _two_rank_configs(device)
    refs = [reference(c) for c in cfgs]
    run_ranks(check_configs, 2, cfgs, refs)


@needs_cuda
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_offload_matches_no_offload(stage: int, compute_dtype: str, monkeypatch) -> None:
    """Offload (masters and AdamW state pinned on the CPU, step there) == the GPU step; the
    host step runs in several parts, copies overlapped (small parts so the tiny model has some)."""
    from loco.engine import offload as host

    monkeypatch.setattr(host, "OFFLOAD_MIN_PART", 4096)
    results = []
    for offload in (False, True):
        model = tiny_gpt().cuda()
        eng = ZeroEngine(model, stage=stage, offload=offload, compute_dtype=compute_dtype, **ADAMW)
        if offload:
            assert eng.master.device.type == "cpu" and eng.master.is_pinned()
            assert all(v.is_pinned() for v in eng.optimizer.state.values())
            assert eng.host_step.grad_host.is_pinned()
            assert next(model.parameters()).is_cuda
        losses, norms = train(eng, 0, 1, 1, LR["adamw"])
        results.append((losses, norms, eng.gather_full()))
    (l0, n0, p0), (l1, n1, p1) = results
    tol = tolerances(dict(compute_dtype=compute_dtype, optim="adamw"))
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=tol["loss_rtol"], atol=0)
    torch.testing.assert_close(
        torch.tensor(n1), torch.tensor(n0), rtol=5 * tol["loss_rtol"], atol=1e-6
    )
    torch.testing.assert_close(p1, p0, rtol=0, atol=tol["param_atol"])


def _median_pair(fa, fb, reps: int) -> tuple[float, float]:
    """Median times of ``fa`` and ``fb``, measured in alternating turns."""
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


@needs_cuda
def test_offload_step_as_fast_as_torch_fused_adamw() -> None:
    """The offloaded optimizer step (CPU, pinned) vs ``torch.optim.AdamW(fused=True)`` on CPU.

    10.7M parameters (the ``small`` model's shape). Both run torch's fused AdamW kernel, so
    the goal is a ratio of 1; medians of 15 alternating turns, with 15% allowed for timer noise.
    (On a CPU-only machine offload does not apply; ``scripts/bench/zero_step.py`` reports the
    same comparison for the flat optimizer as ``adam_cpu``.)
    """
    cfg = GPTConfig(vocab_size=256, seq_len=64, n_layer=6, n_head=6, d_model=384)
    torch.manual_seed(0)
    eng = ZeroEngine(GPT(cfg).cuda(), stage=0, offload=True, **ADAMW)
    n = eng.opt_hi - eng.opt_lo
    grad = torch.randn(n, pin_memory=True)
    ref_model = GPT(cfg)
    for p in ref_model.parameters():
        p.grad = torch.randn_like(p)
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    rest = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-4,
        fused=True,
    )
    assert eng.master.device.type == "cpu" and n >= FlatLayout(ref_model).numel
    ours, theirs = _median_pair(
        lambda: eng.optimizer.step(eng.master, grad, 1e-4), ref.step, reps=15
    )
    print(f"offload AdamW step {ours * 1e3:.2f} ms, torch fused {theirs * 1e3:.2f} ms")
    assert ours <= 1.15 * theirs, (ours, theirs)


def _small_collectives_on_nccl(rank: int, world: int) -> None:
    from loco.site_comm import SiteComm

    comm = SiteComm()
    assert comm.backend == "nccl"
    assert comm.small_device == torch.device("cuda", torch.cuda.current_device())
    t = comm._small([1.5, 2.0], torch.float64)
    torch.distributed.all_reduce(t)  # NCCL accepts the small tensor as SiteComm builds it
    assert t.tolist() == [1.5, 2.0]
    with pytest.raises((RuntimeError, ValueError)):  # and refuses a CPU one, what it used to be
        torch.distributed.all_reduce(torch.tensor([1.5, 2.0], dtype=torch.float64))


@needs_cuda
def test_site_comm_small_collectives_take_gpu_tensors_under_nccl() -> None:
    """The small collectives (the train log's loss, eval, the round's figures) build their
    tensors on the rank's GPU under NCCL, which refuses CPU tensors."""
    run_ranks(_small_collectives_on_nccl, 1, backend="nccl")
