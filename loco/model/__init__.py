"""Decoder-only transformer models: the dense GPT and the GPT with mixture-of-experts MLPs."""

from typing import Any

from loco.model.gpt import GPT, SIZES, GPTConfig
from loco.model.gpt import build_model as build_dense
from loco.model.moe import MoEOptions
from loco.model.moe_gpt import MOE_SIZES, MoEGPT, build_moe_model

# every model size by name (``model.size``)
MODEL_SIZES: dict[str, dict[str, int]] = {**SIZES, **MOE_SIZES}


def build_model(size: str, *, moe: MoEOptions | None = None, ep: int | None = None,
                **kwargs: Any) -> GPT:  # fmt: skip
    """Build any named size (dense or MoE; ``moe``/``ep`` apply to MoE sizes only)."""
    if size in MOE_SIZES:
        return build_moe_model(size, moe=moe, ep=ep, **kwargs)
    return build_dense(size, **kwargs)


__all__ = ["GPT", "GPTConfig", "SIZES", "MODEL_SIZES", "MOE_SIZES", "MoEGPT", "MoEOptions",
           "build_model"]  # fmt: skip
