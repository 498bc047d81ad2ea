"""Decoder-only transformer models."""

from loco.model.gpt import GPT, GPTConfig, SIZES, build_model

__all__ = ["GPT", "GPTConfig", "SIZES", "build_model"]
