"""A GPT-style decoder-only transformer.

Pre-norm blocks, causal attention through ``F.scaled_dot_product_attention``, a GELU MLP,
learned absolute positions and an output head tied to the token embedding. Initialisation
follows GPT-2: N(0, 0.02) everywhere, with the residual output projections scaled by
1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "pick a head count that divides it"
            )
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")


# name -> architecture (vocab and seq_len come from the data and train config)
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=5, n_head=4, d_model=128),  # ~1.0M parameters at vocab 256
    "small": dict(n_layer=6, n_head=6, d_model=384),  # ~10.7M
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768),  # 124M at vocab 50257
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        # With a cache and T == 1 the single query may attend to every cached key.
        causal = kv_cache is None or T > 1
        if kv_cache is not None and T > 1:
            # queries sit at the end of the key sequence: build the offset causal mask
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))[0]
        return x + self.mlp(self.ln2(x))

    def forward_cached(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln1(x), kv_cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class GPT(nn.Module):
    """Decoder-only transformer over a token vocabulary.

    ``forward(idx)`` returns logits of shape (B, T, vocab); ``forward(idx, targets)`` returns
    the mean cross-entropy over all B*T positions. ``blocks`` is an ``nn.ModuleList`` so that
    engines can hook, checkpoint or shard the model block by block.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("weight"):
                    p.fill_(1.0)  # norm gains
                else:
                    p.zero_()
            elif name.endswith("proj.weight"):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, 0.02)

    def num_params(self) -> int:
        """Distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, pos0: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if pos0 + T > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {pos0 + T} tokens exceeds the model's context of {self.cfg.seq_len}"
            )
        pos = torch.arange(pos0, pos0 + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head_loss(x, targets)

    def forward_cached(
        self, idx: torch.Tensor, cache: list | None = None, pos0: int = 0
    ) -> tuple[torch.Tensor, list]:
        """Logits (B, T, vocab) of ``idx`` placed at positions ``pos0 ..`` after the keys and
        values in ``cache`` (one ``(k, v)`` per block, None: empty), and the extended cache.

        Feeding a sequence in pieces gives the logits of one full :meth:`forward` (to fp32
        rounding).
        """
        x = self.embed(idx, pos0=pos0)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block.forward_cached(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T) with a KV cache.

        ``temperature`` 0 is greedy (deterministic); ``top_k`` keeps the k likeliest tokens.
        The context is cropped to the last ``seq_len`` tokens; once the cache is full the
        window restarts from the most recent ``seq_len // 2`` tokens.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        out = idx
        cache: list | None = None
        pos = 0
        cur = idx[:, -self.cfg.seq_len :]
        for _ in range(max_new_tokens):
            if cache is not None and pos + cur.shape[1] > self.cfg.seq_len:
                cache, pos = None, 0
                cur = out[:, -(self.cfg.seq_len // 2) :]
            logits, cache = self.forward_cached(cur, cache, pos)
            pos += cur.shape[1]
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            cur = nxt
        return out


def build_model(
    size: str, *, vocab_size: int, seq_len: int, dropout: float = 0.0, **overrides: int
) -> GPT:
    """Build a named model size; ``overrides`` replace any architecture field."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    arch = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    return GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, dropout=dropout, **arch))
