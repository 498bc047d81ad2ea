"""Small MoE models and layers for the tests."""

from __future__ import annotations

import math

import torch

from loco.model import MoEGPT, MoEOptions
from loco.model.gpt import GPTConfig
from loco.model.moe import MoELayer

CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def moe_gpt(seed: int = 0, cfg: GPTConfig = CFG, **opts) -> MoEGPT:
    torch.manual_seed(seed)
    return MoEGPT(cfg, MoEOptions(**{"experts": 4, **opts}))


def two_way_layer(**opts) -> MoELayer:
    """A layer over d_model 2 with 2 experts whose router gives logits [ln 3 * x0, ln 3 * x1]
    (so x = [1, 0] routes with probabilities [0.75, 0.25])."""
    cfg = GPTConfig(vocab_size=8, seq_len=4, n_layer=1, n_head=1, d_model=2, mlp_ratio=1)
    layer = MoELayer(cfg, MoEOptions(**{"experts": 2, **opts}))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2) * math.log(3.0))
        torch.manual_seed(0)
        layer.experts.fc_weight.normal_(0, 1)
        layer.experts.proj_weight.normal_(0, 1)
    return layer
