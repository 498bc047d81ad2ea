"""MoE gating on one rank: capacity, drops, gates, the regularisers against hand arithmetic,
the loss's value and gradient, evaluation without drops, the residual MoE, the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loco.config import ConfigError, compose
from loco.model import GPT, MoEGPT, MoEOptions, build_model
from loco.model.gpt import build_model as build_dense
from loco.model.moe import route
from tests.moe.helpers import CFG, moe_gpt, two_way_layer


def test_capacity_is_factor_times_k_times_tokens_over_experts_at_least_min():
    o = MoEOptions(experts=8, k=2, capacity_factor=1.25, min_capacity=4)
    assert o.capacity(1024) == math.ceil(1.25 * 2 * 1024 / 8) == 320
    assert o.capacity(4) == 4  # ceil(1.25) = 2 < min_capacity


def test_top1_fills_places_in_token_order_and_counts_drops():
    # first choices 0, 0, 0, 1; two places per expert: token 2 is dropped
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    r = route(logits, k=1, capacity=2)
    assert r.token.tolist() == [0, 1, 3]
    assert r.slot.tolist() == [0, 1, 2]  # expert * capacity + place
    assert r.kept.tolist() == [2, 1] and r.dropped == 1
    p = torch.softmax(logits, dim=-1)
    assert torch.equal(r.gate, p[[0, 1, 3], [0, 0, 1]])  # Switch: the raw probability


def test_top2_places_every_first_choice_before_any_second_and_renormalises():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [0.0, 3.0, 2.0]])
    r = route(logits, k=2, capacity=2)
    # first choices: 0, 0, 1; second choices: 1 (place 1), 2 (place 0), 2 (place 1)
    assert r.token.tolist() == [0, 1, 2, 0, 1, 2] and r.dropped == 0
    assert r.slot.tolist() == [0, 1, 2, 3, 4, 5]
    assert r.kept.tolist() == [2, 2, 2]
    e1 = math.exp(1.0)
    assert r.gate[0].item() == pytest.approx(e1 / (e1 + 1)) and r.gate[3].item() == pytest.approx(
        1 / (e1 + 1)
    )
    r1 = route(logits, k=2, capacity=1)  # the second choices of tokens 0 and 2 are dropped
    assert r1.token.tolist() == [0, 2, 1] and r1.dropped == 3


def test_load_balancing_and_z_loss_match_hand_arithmetic():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # both tokens: probabilities [0.75, 0.25]
    layer = two_way_layer(aux_coef=1.0, z_coef=0.0, capacity_factor=4.0)
    layer.train()
    layer(x)
    # f = [1, 0], P = [0.75, 0.25]: aux = E * sum f_e P_e = 2 * 0.75
    assert layer.regulariser.item() == pytest.approx(1.5, rel=1e-6)
    x2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # balanced: f = P = [0.5, 0.5] -> 1.0
    layer(x2)
    assert layer.regulariser.item() == pytest.approx(1.0, rel=1e-6)
    z = two_way_layer(aux_coef=0.0, z_coef=1.0)
    z.train()
    z(x)  # logsumexp([ln 3, 0]) = ln 4 for both tokens
    assert z.regulariser.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_metrics_count_drops_and_load_of_the_forwards_since_the_last_read():
    m = moe_gpt(capacity_factor=0.5, min_capacity=1)  # half the places: many drops
    x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len))
    layer = m.moe_layers()[0]
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m.train()
    m(x, x)
    S, E = x.numel(), 4
    logits = F.linear(seen[0].reshape(S, -1), layer.router.weight).detach()
    r = route(logits, k=1, capacity=m.moe.capacity(S))
    kept, dropped = layer.tally[5:].clone(), float(layer.tally[2])
    assert kept.tolist() == r.kept.tolist() and dropped == r.dropped > 0
    assert float(kept.sum()) + dropped == S and float(kept.max()) <= m.moe.capacity(S)
    probs = torch.softmax(logits, dim=-1)
    f = torch.bincount(probs.argmax(dim=-1), minlength=E).double() / S
    aux = E * float((f * probs.double().mean(dim=0)).sum())
    fig = m.train_metrics()
    assert fig["moe_drop_frac"] == pytest.approx(dropped / S)
    assert fig["moe_aux_loss"] == pytest.approx(aux, rel=1e-5)
    for e in range(E):
        assert fig[f"moe_load_{e}"] == pytest.approx(float(kept[e]) / float(kept.sum()))
    assert m.train_metrics() == {}  # read and reset


def test_loss_value_is_the_cross_entropy_and_its_gradient_carries_the_regularisers():
    m = moe_gpt(aux_coef=0.5, z_coef=0.1)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    m.train()
    loss = m(x, x)
    w = m.moe_layers()[0].router.weight
    (g_model,) = torch.autograd.grad(loss, w)
    logits = m(x)
    ce = F.cross_entropy(logits.view(-1, CFG.vocab_size), x.reshape(-1))
    reg = sum(layer.regulariser for layer in m.moe_layers())
    assert loss.item() == ce.item()  # bit-identical value
    (g_ce,) = torch.autograd.grad(ce, w, retain_graph=True)
    (g_all,) = torch.autograd.grad(ce + reg, w)
    assert torch.allclose(g_model, g_all, atol=1e-7) and not torch.allclose(g_ce, g_all)


def test_routing_is_deterministic_for_a_seed():
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    a, b = moe_gpt(seed=3), moe_gpt(seed=3)
    assert a(x, x).item() == b(x, x).item()
    assert moe_gpt(seed=4)(x, x).item() != a(x, x).item()


def test_evaluation_drops_nothing_so_the_kv_cache_gives_the_full_forward():
    m = moe_gpt(capacity_factor=0.25, min_capacity=1).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        full = m(x)
        a, cache = m.forward_cached(x[:, :5])
        b, cache = m.forward_cached(x[:, 5:6], cache, pos0=5)
        c, _ = m.forward_cached(x[:, 6:], cache, pos0=6)
    assert torch.allclose(torch.cat([a, b, c], dim=1), full, atol=1e-5)
    out = m.generate(x[:, :4], max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 10)


def test_residual_moe_mixes_a_dense_mlp_with_one_expert():
    layer = two_way_layer(residual=True, capacity_factor=4.0)
    with torch.no_grad():
        layer.experts.proj_weight.zero_()  # the experts add nothing: the output is the dense part
    x = torch.randn(1, 3, 2)
    tokens = x.reshape(3, 2)
    c = torch.softmax(F.linear(tokens, layer.coef.weight), dim=-1)
    want = layer.dense(tokens) * c[:, 1:]
    assert torch.allclose(layer(x).reshape(3, 2), want, atol=1e-6)
    m = moe_gpt(residual=True)
    names = {n for n, _ in m.named_parameters()}
    assert "blocks.1.mlp.dense.fc.weight" in names and "blocks.1.mlp.coef.weight" in names
    with pytest.raises(ValueError, match="model.moe.k=1"):
        MoEOptions(residual=True, k=2)


def test_every_other_block_is_moe_and_dense_sizes_are_unchanged():
    m = build_model("moe-tiny", vocab_size=256, seq_len=32)
    assert isinstance(m, MoEGPT) and [
        i for i, b in enumerate(m.blocks) if hasattr(b.mlp, "router")
    ] == [1, 3]
    torch.manual_seed(0)
    d = build_model("tiny", vocab_size=256, seq_len=32)
    torch.manual_seed(0)
    ref = build_dense("tiny", vocab_size=256, seq_len=32)
    assert type(d) is GPT
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), ref.parameters(), strict=True))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.moe.k=3", "model.moe.experts=2"], "model.moe.k=3"),
        (["model.moe.residual=true", "model.moe.k=2"], "model.moe.k=1"),
        (["model.moe.capacity_factor=0"], "capacity_factor"),
        (["site.nproc=2", "model.moe.ep=3"], "model.moe.ep=3"),
        (["site.nproc=2", "model.moe.experts=3"], "model.moe.ep=2"),
    ],
)
def test_config_rejects_bad_moe_options_with_one_line(overrides, words):
    with pytest.raises(ConfigError, match=words):
        compose(["+site=eu", "model=moe-tiny", *overrides])


def test_config_accepts_the_moe_sizes():
    cfg = compose(["+site=eu", "model=moe-small", "model.moe.k=2", "site.nproc=2"])
    assert cfg.model.size == "moe-small" and cfg.model.moe.options().k == 2


def test_pyramid_residual_moe_has_more_experts_in_the_second_half():
    """PR-MoE: residual MoE layers with ``pyramid`` experts in the model's second half; the
    metrics cover every expert index, and the weights alone rebuild the same model."""
    from loco.model.gpt import GPTConfig
    from loco.model.moe_gpt import model_of_state

    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=2, d_model=32)
    m = moe_gpt(cfg=cfg, residual=True, pyramid=8)
    assert [layer.opts.experts for layer in m.moe_layers()] == [4, 8]  # blocks 1 and 3
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    m.train()
    m(x, x).backward()
    fig = m.train_metrics()
    assert sum(fig[f"moe_load_{e}"] for e in range(8)) == pytest.approx(1.0)
    again = model_of_state(cfg, m.state_dict(), {"k": 1})
    assert again.moe.pyramid == 8 and again.moe.residual
    again.load_state_dict(m.state_dict())
    m.eval(), again.eval()
    assert torch.equal(m(x), again(x))
    with pytest.raises(ValueError, match="pyramid"):
        MoEOptions(pyramid=-1)


@pytest.mark.parametrize(
    "moe_config",
    ['{"k": "x"}', "[1, 2]", '{"k": 3}', '{"capacity_factor": NaN}', "not json"],
)
def test_an_exported_moe_model_with_bad_options_is_refused_with_a_cause(tmp_path, moe_config):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from loco.export import load_model, save_weights

    m = moe_gpt(experts=2)
    good = save_weights(m.cfg, m.state_dict(), tmp_path / "m.safetensors", moe=m.moe)
    again, _ = load_model(good)
    assert isinstance(again, MoEGPT) and again.moe == m.moe
    with safe_open(str(good), framework="pt") as f:
        info = dict(f.metadata())
    info["moe_config"] = moe_config
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata=info)
    with pytest.raises(ValueError) as e:
        load_model(bad)
    assert "\n" not in str(e.value) and "bad.safetensors" in str(e.value)
