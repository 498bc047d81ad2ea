"""ZeroEngine on one rank (no process group): parity, API, errors, no collectives."""

from __future__ import annotations

import pytest
import torch

from loco.engine.zero import ZeroEngine
from tests.engine.dist_utils import tiny_gpt
from tests.engine.parity import reference, train


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_world1_matches_plain_and_sends_nothing(stage: int) -> None:
    """One rank: same arithmetic as PlainEngine up to the fused AdamW kernel (atol 1e-6)."""
    cfg = dict(stage=stage, optim="adamw", grad_clip=0.3, weight_decay=0.1, bucket_mb=0.001)
    ref_l, ref_n, ref_p = reference(cfg)
    eng = ZeroEngine(tiny_gpt(), **cfg)
    losses, norms = train(eng, 0, 1, 1, 1e-2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_l), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_n), rtol=1e-5, atol=0)
    torch.testing.assert_close(eng.gather_full(), ref_p, rtol=0, atol=1e-6)
    assert eng.comm.stats.total() == 0


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_activation_checkpointing_and_bf16_single(stage: int) -> None:
    """bf16 compute against the fp32 reference within bf16 tolerance (see parity.py)."""
    cfg = dict(stage=stage, optim="sgd")
    ref_l, _, ref_p = reference(cfg)
    eng = ZeroEngine(
        tiny_gpt(), compute_dtype="bf16", activation_checkpointing=True, grad_accum=2, **cfg
    )
    losses, _ = train(eng, 0, 1, 2, 5e-2)
    assert next(eng.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_l), rtol=2e-3, atol=0)
    torch.testing.assert_close(eng.gather_full(), ref_p, rtol=0, atol=2e-3)


def test_range_api_and_state_dict_roundtrip() -> None:
    eng = ZeroEngine(tiny_gpt(), stage=3, optim="adamw")
    train(eng, 0, 1, 1, 1e-2)
    lo, hi = eng.flat_range
    assert (lo, hi) == (0, eng.layout.numel)
    st = eng.state_dict()
    assert set(eng.optim_state_range()) == {"exp_avg", "exp_avg_sq"} and eng.optim_step == 5
    full = eng.full_state_dict()
    assert set(full) == set(tiny_gpt().state_dict())
    assert full["head.weight"].data_ptr() != full["wte.weight"].data_ptr()
    torch.testing.assert_close(full["head.weight"], full["wte.weight"])
    # write through the range API; the next forward sees it
    x = torch.randint(0, 64, (2, 17))
    before = eng.model(x[:, :-1], x[:, 1:]).item()
    eng.master_range().mul_(0.0)
    eng.sync_params()
    zero_loss = eng.model(x[:, :-1], x[:, 1:]).item()
    assert zero_loss == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=1e-4)
    fresh = ZeroEngine(tiny_gpt(seed=3), stage=3, optim="adamw")
    fresh.load_state_dict(st)
    assert fresh.model(x[:, :-1], x[:, 1:]).item() == pytest.approx(before, rel=1e-6)
    torch.testing.assert_close(fresh.optim_state_range()["exp_avg"], st["optim"]["exp_avg"])
    bad = dict(st, layout_hash="0" * 16)
    with pytest.raises(ValueError, match="same model architecture"):
        fresh.load_state_dict(bad)


def test_user_errors_and_offload_warning() -> None:
    with pytest.raises(ValueError, match="choose 0, 1, 2 or 3"):
        ZeroEngine(tiny_gpt(), stage=4)
    with pytest.raises(ValueError, match="compute_dtype"):
        ZeroEngine(tiny_gpt(), compute_dtype="fp16")
    with pytest.raises(ValueError, match="collective"):
        ZeroEngine(tiny_gpt(), collective="ring")
    with pytest.warns(UserWarning, match="GPU runs only"):
        eng = ZeroEngine(tiny_gpt(), offload=True)
    assert not eng.offload
    with pytest.raises(ValueError, match="before any backward"):
        eng.step(1e-3)
    x = torch.randint(0, 64, (2, 17))
    eng.backward(eng.model(x[:, :-1], x[:, 1:]))
    with pytest.raises(ValueError, match="grad_accum"):
        eng.backward(eng.model(x[:, :-1], x[:, 1:]))


def test_stage3_frees_blocks_and_eval_works() -> None:
    eng = ZeroEngine(tiny_gpt(), stage=3)
    assert all(u.buf.untyped_storage().nbytes() == 0 for u in eng.shards.units)
    x = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        eng.model(x[:, :-1], x[:, 1:])
    assert all(u.buf.untyped_storage().nbytes() == 0 for u in eng.shards.units)
    eng.backward(eng.model(x[:, :-1], x[:, 1:]))
    assert all(u.buf.untyped_storage().nbytes() == 0 for u in eng.shards.units)
    eng.step(1e-3)
    with eng.gathered():
        out = eng.model.generate(x[:, :4], 3)
    assert out.shape == (2, 7)
