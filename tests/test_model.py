"""The GPT model: causal mask, initial loss, sizes, tied weights, cached generation."""

from __future__ import annotations

import math

import pytest
import torch

from loco.model import GPT, GPTConfig, build_model


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=2, d_model=32, **kw))


def test_changing_a_later_token_never_changes_an_earlier_logit():
    m = small_gpt().eval()
    x = torch.randint(0, 256, (2, 32))
    base = m(x)
    for t in (0, 5, 17, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1 + torch.arange(2)) % 256
        out = m(y)
        # positions before t see identical inputs: bitwise equal logits
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_loss_at_init_is_close_to_uniform(size):
    torch.manual_seed(1)
    m = build_model(size, vocab_size=256, seq_len=64)
    x = torch.randint(0, 256, (8, 64))
    with torch.no_grad():
        loss = float(m(x, torch.roll(x, -1, 1)))
    # N(0, 0.02) init gives logits of std ~0.02*sqrt(d)*|ln_f| << 1: within 0.1 nats of ln 256
    assert abs(loss - math.log(256)) < 0.1, loss


def test_sizes_and_tied_head():
    counts = {
        s: build_model(s, vocab_size=256, seq_len=128).num_params() for s in ("tiny", "small")
    }
    assert 0.9e6 < counts["tiny"] < 1.2e6
    assert 9e6 < counts["small"] < 12e6
    m = build_model("gpt2-124m", vocab_size=50257, seq_len=1024)
    assert 123e6 < m.num_params() < 125e6
    assert m.head.weight is m.wte.weight


def test_residual_projections_are_scaled_down():
    m = build_model("tiny", vocab_size=256, seq_len=128)
    proj = torch.cat([b.mlp.proj.weight.detach().flatten() for b in m.blocks])
    fc = torch.cat([b.mlp.fc.weight.detach().flatten() for b in m.blocks])
    ratio = float(proj.std() / fc.std())
    assert abs(ratio - 1 / math.sqrt(2 * m.cfg.n_layer)) < 0.05


def test_cached_greedy_generation_equals_full_recompute():
    m = small_gpt().eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = m.generate(prompt, 27, temperature=0)  # 32 tokens: exactly the context
    ref = prompt
    with torch.no_grad():
        for _ in range(27):
            ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    longer = m.generate(prompt, 70, temperature=0.8, top_k=10)  # past the context: cache restarts
    assert longer.shape == (2, 75) and torch.equal(longer[:, :5], prompt)


def test_incremental_decoding_equals_the_full_forward():
    # a prompt of 7 tokens, then 2, then one at a time up to the full context: every position's
    # logits match one full forward; tolerance: fp32 rounding of reordered sums (|logit| ~ 1)
    m = small_gpt().eval()
    idx = torch.randint(0, 256, (2, m.cfg.seq_len))
    with torch.no_grad():
        full = m(idx)
        pieces, cache, pos = [], None, 0
        for n in [7, 2] + [1] * (m.cfg.seq_len - 9):
            logits, cache = m.forward_cached(idx[:, pos : pos + n], cache, pos)
            pieces.append(logits)
            pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_bad_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge", vocab_size=256, seq_len=8)
