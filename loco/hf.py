"""The Hugging Face GPT-2 layout of a loco GPT: a directory ``GPT2LMHeadModel.from_pretrained``
loads and ``AutoTokenizer.from_pretrained`` reads, computing the same function as the loco model.

A loco GPT is a GPT-2 without some biases: pre-norm blocks, tanh GELU (``gelu_new``), learned
positions, LayerNorm eps 1e-5, attention scaled by 1/sqrt(head_dim), head tied to ``wte``. The
biases loco does not have (``model`` ``bias=False``) are written as zeros. HF's ``Conv1D`` stores
a weight as [in, out], the transpose of ``nn.Linear``; loco's ``qkv`` is [q|k|v] like
``c_attn``. The directory holds ``config.json``, ``model.safetensors``, ``loco.json`` (what it
was exported from, the vocabulary; its presence marks the directory as an export that a later
export may overwrite), ``README.md`` and, when the model's tokenizer is known,
``tokenizer.json`` and ``tokenizer_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from loco.data.tokenizer import Tokenizer
from loco.fsutil import atomic_write
from loco.model.gpt import GPT, GPTConfig

FORMAT = "loco-hf"
MARKER = "loco.json"
_FILES = ("config.json", "model.safetensors", MARKER, "README.md", "tokenizer.json",
          "tokenizer_config.json")  # fmt: skip
_MAX_MARKER_BYTES = 1 << 20

# (HF name, loco name, HF Conv1D: stored transposed) of the parts of a block
_BLOCK = (
    ("ln_1", "ln1", False),
    ("attn.c_attn", "attn.qkv", True),
    ("attn.c_proj", "attn.proj", True),
    ("ln_2", "ln2", False),
    ("mlp.c_fc", "mlp.fc", True),
    ("mlp.c_proj", "mlp.proj", True),
)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The GPT-2 names and layouts of ``model``'s weights (fp32, contiguous, own storage);
    ``lm_head`` is tied to ``transformer.wte`` and not stored."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    parts = [(f"transformer.h.{i}.{hf}", f"blocks.{i}.{lc}", conv)
             for i in range(model.cfg.n_layer) for hf, lc, conv in _BLOCK]  # fmt: skip
    for hf, lc, conv in [*parts, ("transformer.ln_f", "ln_f", False)]:
        w = sd[f"{lc}.weight"]
        out[f"{hf}.weight"] = w.t() if conv else w
        out[f"{hf}.bias"] = sd.get(f"{lc}.bias", torch.zeros(w.shape[0]))
    return {k: v.contiguous().clone() for k, v in out.items()}


def eos_id(cfg: GPTConfig, tokenizer: Tokenizer | None) -> int:
    """The id GPT-2's config names as begin and end of text: the NUL byte's token when the
    tokenizer is known (loco has no special tokens; NUL is rare in text), else 50256 (GPT-2's
    end of text) when the vocabulary has it, else 0."""
    if tokenizer is not None:
        return tokenizer.byte_id(0)
    return 50256 if cfg.vocab_size > 50256 else 0


def hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """``config.json`` of a ``GPT2LMHeadModel`` with ``cfg``'s architecture."""
    eos = eos_id(cfg, tokenizer)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_ratio * cfg.d_model,
        "activation_function": "gelu_new",  # the tanh approximation, as loco's MLP
        "layer_norm_epsilon": 1e-5,  # torch's LayerNorm default, as loco's
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
        "dtype": "float32",
    }


def check_out_dir(out: Path) -> None:
    """Raise ValueError unless ``out`` is absent, an empty directory or an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; --format hf writes a directory")
    if not any(out.iterdir()):
        return
    marker = out / MARKER
    try:
        ok = marker.is_file() and marker.stat().st_size <= _MAX_MARKER_BYTES
        doc = json.loads(marker.read_bytes()) if ok else None
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(
            f"{out} is a non-empty directory that is not a loco export (no {MARKER}); "
            "give a new or empty directory"
        )


def _readme(cfg: GPTConfig, tokenizer: Tokenizer | None, meta: dict[str, Any]) -> str:
    if tokenizer is None:
        vocab = "token ids of a pre-tokenized .bin corpus (no tokenizer known to loco)"
    elif tokenizer.kind == "bytes":
        vocab = "bytes: token id b is byte b of UTF-8 text (vocabulary 256)"
    else:
        vocab = f"a byte-level BPE of {tokenizer.vocab_size} tokens (tokenizer.json)"
    src = ", ".join(f"{k} {v}" for k, v in meta.items() if v is not None)
    return (
        f"# loco GPT ({cfg.n_layer} layers, d_model {cfg.d_model}, context {cfg.seq_len})\n\n"
        f"Exported by `python -m loco.export --format hf` from {src}.\n\n"
        f"Vocabulary: {vocab}. Begin/end of text id: {eos_id(cfg, tokenizer)} "
        "(loco trains without special tokens).\n\n"
        "```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n"
        "model = GPT2LMHeadModel.from_pretrained(PATH)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)  # when tokenizer.json is here\n```\n"
    )


def tokenizer_config(cfg: GPTConfig) -> dict[str, Any]:
    """``tokenizer_config.json``: the ``tokenizers`` file as it is, no special tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.seq_len,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }


def save_hf(model: GPT, out: str | Path, tokenizer: Tokenizer | None = None,
            meta: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``model`` (and ``tokenizer``, when known) as a Hugging Face GPT-2 directory
    ``out``. Raises ValueError when ``out`` is a file or another non-empty directory."""
    from safetensors.torch import save

    if getattr(model, "moe", None) is not None:
        raise ValueError("the Hugging Face GPT-2 layout has no experts: export an MoE model with "
                         "--format loco")  # fmt: skip
    out = Path(out)
    check_out_dir(out)
    cfg, meta = model.cfg, {k: v for k, v in (meta or {}).items() if v is not None}
    about = {
        "format": FORMAT,
        "gpt_config": dataclasses.asdict(cfg),
        "tokenizer": tokenizer.kind if tokenizer else None,
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
        **{k: str(v) for k, v in meta.items()},
    }
    files: dict[str, bytes] = {
        "model.safetensors": save(hf_state_dict(model), metadata={"format": "pt"}),
        "config.json": _json(hf_config(cfg, tokenizer)),
        "README.md": _readme(cfg, tokenizer, meta).encode(),
        MARKER: _json(about),
    }
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer.hf_json().encode()
        files["tokenizer_config.json"] = _json(tokenizer_config(cfg))
    out.mkdir(parents=True, exist_ok=True)
    for name in _FILES:  # an earlier export's files that this one does not replace go
        if name not in files:
            (out / name).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write(out / name, data)
    return out


def _json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
