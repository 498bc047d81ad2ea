"""Decoder-only transformer models."""

from loco.model.gpt import GPT, SIZES, GPTConfig, build_model

__all__ = ["GPT", "GPTConfig", "SIZES", "build_model"]
