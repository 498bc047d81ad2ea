"""Conformance: every engine implements the seams it claims (``loco.engine.base``).

Run in this process on a gloo group of one rank. Every implementation is checked with
``isinstance`` against its runtime-checkable Protocol, and every call of that Protocol is made
once with its contract checked: ZeroEngine (stages 0-3, AdamW, and SGD without momentum, whose
optimizer keeps no state) against ``Engine``; the test-only PlainEngine against ``StepEngine``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from loco.engine.base import Engine, FlatEngine, StepEngine
from loco.engine.flat import FlatLayout
from loco.engine.zero import ZeroEngine
from tests.engine.dist_utils import TIMEOUT, tiny_gpt
from tests.engine.plain import PlainEngine

CLIP = 1e-3  # far below the tiny model's gradient norm: step() must report the norm before it
ZERO = dict(optim="adamw", grad_clip=CLIP, weight_decay=0.1, bucket_mb=0.001)
ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Case:
    """One implementation: how to build it from a model seed, the Protocol it implements, its
    optimizer state names, and the relative tolerance of its losses against an fp32 model (0:
    bitwise equal)."""

    make: Callable[[int], StepEngine]
    proto: type
    names: tuple[str, ...] = ()
    rtol: float = 0.0


def _zero(**kw: Any) -> Callable[[int], StepEngine]:
    return lambda seed: ZeroEngine(tiny_gpt(seed), **{**ZERO, **kw})


CASES = {
    **{f"zero{s}": Case(_zero(stage=s), Engine, ADAM_STATE) for s in range(4)},
    # bf16 compute: the compute parameters are copies, so sync_params has work to do
    "zero2-bf16": Case(_zero(stage=2, compute_dtype="bf16"), Engine, ADAM_STATE, rtol=2e-2),
    # an optimizer that keeps no state: optim_state_range() is empty
    "zero2-sgd": Case(_zero(stage=2, optim="sgd", momentum=0.0, weight_decay=0.0), Engine),
    "plain": Case(lambda seed: PlainEngine(tiny_gpt(seed), grad_clip=CLIP), StepEngine),
}


@pytest.fixture
def gloo1() -> Iterator[None]:
    """A default gloo process group of one rank, destroyed afterwards."""
    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=TIMEOUT)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    return x[:, :-1], x[:, 1:]


def _loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(*_batch()))


def _grad_norm(seed: int) -> float:
    """The gradient norm of one batch on a plain model of ``seed`` (tied weights once)."""
    model = tiny_gpt(seed)
    model(*_batch()).backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def _with_values(flat: torch.Tensor) -> nn.Module:
    """A plain model whose trainable parameters are ``flat`` (in flat-layout order)."""
    model = tiny_gpt()
    layout = FlatLayout(model)
    with torch.no_grad():
        for spec, p in zip(layout.specs, layout.params, strict=True):
            p.copy_(flat[spec.offset : spec.end].view(spec.shape))
    return model


def _close(got: float, want: float, rtol: float) -> bool:
    return got == want if rtol == 0 else got == pytest.approx(want, rel=rtol)


def check_step_seam(eng: StepEngine, case: Case) -> None:
    """model, backward, step, state_dict, load_state_dict."""
    assert isinstance(eng, StepEngine)
    assert isinstance(eng.model, nn.Module)
    before = _loss(eng.model)
    eng.backward(eng.model(*_batch()))
    norm = eng.step(1e-2)
    assert isinstance(norm, float) and norm > CLIP
    assert norm == pytest.approx(_grad_norm(0), rel=case.rtol or 1e-5), "the norm before clipping"
    assert all(p.grad is None for p in eng.model.parameters()), "step() clears the gradients"
    after = _loss(eng.model)
    assert after != before, "step() applied no update"
    state = eng.state_dict()
    assert isinstance(state, dict)
    fresh = case.make(3)
    assert _loss(fresh.model) != after
    fresh.load_state_dict(state)
    assert _loss(fresh.model) == after, "load_state_dict restores what state_dict saved"


def check_flat_seam(eng: FlatEngine, case: Case) -> None:
    """Geometry, master and optimizer-state ranges, optim_step, sync_params, gather_full."""
    assert isinstance(eng, FlatEngine)
    ref = FlatLayout(tiny_gpt())
    assert isinstance(eng.model, nn.Module) and isinstance(eng.layout, FlatLayout)
    assert eng.layout_hash == eng.layout.hash == ref.hash
    assert eng.numel == eng.layout.numel == ref.numel
    assert eng.padded == eng.layout.padded_numel(1) >= eng.numel
    assert (eng.lo, eng.hi) == (0, eng.padded)
    assert eng.flat_range == (0, eng.numel)
    lo, hi = eng.flat_range

    master = eng.master_range()
    assert master.dtype == torch.float32 and master.shape == (hi - lo,)
    full = eng.gather_full()
    assert full.device.type == "cpu" and full.dtype == torch.float32 and full.shape == (eng.numel,)
    assert torch.equal(full[lo:hi], master.cpu())

    state = eng.optim_state_range()
    assert sorted(state) == sorted(case.names)
    assert all(v.dtype == torch.float32 and v.shape == (hi - lo,) for v in state.values())
    assert eng.optim_step == 1  # check_step_seam ran one step
    eng.optim_step = 7
    assert eng.optim_step == 7

    # writes through the views, published by sync_params: the model computes with them (large
    # values, so a loss from stale parameters is far off even at bf16's tolerance)
    new = torch.randn(eng.numel, generator=torch.Generator().manual_seed(11)) * 0.5
    stale = _loss(eng.model)
    eng.master_range().copy_(new[lo:hi])
    for v in eng.optim_state_range().values():
        v.fill_(0.5)
    eng.sync_params(optim_state=True)
    assert torch.equal(eng.master_range().cpu(), new[lo:hi])
    assert all(bool((v == 0.5).all()) for v in eng.optim_state_range().values())
    assert torch.equal(eng.gather_full(), new)
    want = _loss(_with_values(new))
    assert not _close(stale, want, case.rtol)
    assert _close(_loss(eng.model), want, case.rtol)
    eng.master_range().mul_(2.0)
    eng.sync_params()
    assert _close(_loss(eng.model), _loss(_with_values(new * 2.0)), case.rtol)


@pytest.mark.parametrize("name", list(CASES))
def test_engine_conforms(name: str, gloo1: None) -> None:
    case = CASES[name]
    eng = case.make(0)
    assert isinstance(eng, case.proto)
    check_step_seam(eng, case)
    if isinstance(eng, FlatEngine):
        assert case.proto is Engine
        check_flat_seam(eng, case)
