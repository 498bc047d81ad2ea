"""Helpers shared by the compression tests."""

from __future__ import annotations

import os

import pytest
import torch

import loco.compress as lc

# Codec configurations the conformance tests run over: every codec, default and edge options.
CONFIGS: list[tuple[str, dict]] = [
    ("none", {}),
    ("bf16", {}),
    ("bf16", {"rounding": "stochastic"}),
    ("int8", {}),
    ("int8", {"block": 7, "scale_dtype": "fp16"}),
    ("int8", {"rounding": "stochastic"}),
    ("int4", {}),
    ("int4", {"block": 64, "scale_dtype": "fp32"}),
    ("int4", {"rounding": "stochastic"}),
    ("fp4", {}),
    ("fp4", {"block": 32, "scale_dtype": "fp32"}),
    ("fp4", {"rounding": "stochastic"}),
    ("topk", {}),
    ("topk", {"block": 1000, "k": 33, "scale_dtype": "fp16"}),
    ("topk", {"block": 16, "k": 16}),
    ("topk", {"block": 512, "k": 100}),
    ("topk", {"block": 64, "k": 3, "rounding": "stochastic"}),
    ("sparse", {}),
    ("sparse", {"block": 64, "k": 5, "bits": 1}),
    ("sparse", {"block": 100, "k": 9, "bits": 3, "scale_dtype": "fp16"}),
    ("sparse", {"block": 256, "k": 256, "bits": 4}),
    ("sparse", {"block": 32, "k": 7, "rounding": "stochastic"}),
    ("sparse", {"block": 4096, "k": 64, "bits": 4, "scale_dtype": "fp16",
                "rounding": "stochastic"}),
    ("sign", {}),
    ("sign", {"block": 7, "scale_dtype": "fp16"}),
    ("sign", {"block": 4096}),
    ("ternary", {}),
    ("ternary", {"block": 7, "scale_dtype": "fp16"}),
    ("ternary", {"block": 64}),
    ("ternary", {"block": 4096, "scale_dtype": "fp16"}),
]  # fmt: skip


def config_id(cfg: tuple[str, dict]) -> str:
    name, opts = cfg
    return name + "".join(f"-{k}={v}" for k, v in sorted(opts.items()))


def ext_or_skip():
    """The compiled ops, or skip (fail instead when LOCO_REQUIRE_EXT=1, as in CI)."""
    ops = lc.ext_ops()
    if ops is None:
        if os.environ.get("LOCO_REQUIRE_EXT") == "1":
            pytest.fail(f"compiled kernels required but unavailable: {lc.ext_error()}")
        pytest.skip(f"compiled kernels unavailable: {lc.ext_error()}")
    return ops


def op_args(codec) -> tuple:  # noqa: ANN001
    """The kernels' (codec, block, k, fp16_scale) arguments of a codec (k: the header's field)."""
    return (codec.codec_id, codec.block, codec.k_field, codec.fp16_scale)


def scales_per_element(codec, payload: torch.Tensor, n: int) -> torch.Tensor:  # noqa: ANN001
    """The decoded block scale of every element (float64), read from a payload."""
    nb = -(-n // codec.block)
    if codec.fp16_scale:
        s = payload[: 2 * nb].view(torch.float16).double()
    else:
        s = payload[: 4 * nb].view(torch.float32).double()
    return s.repeat_interleave(codec.block)[:n]
