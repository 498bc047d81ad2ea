"""Export a trained model: ``python -m loco.export <checkpoint | checkpoints dir | run dir> [out]``.

Writes one safetensors file (``.pt``: a torch file) of the full model: every tensor of
``loco.model.GPT``'s ``state_dict`` by name and shape (the output head is tied to ``wte.weight``
and stored once), fp32, with the architecture (``GPTConfig``) and the source (run id, site,
step) as metadata. :func:`load_model` reads it back, or reads a checkpoint directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from loco.model import GPT
from loco.model.gpt import SIZES, GPTConfig

FORMAT = "loco-gpt"
TIED = "head.weight"  # same tensor as wte.weight


def resolve_checkpoint(path: str | Path) -> Path:
    """The committed checkpoint that ``path`` names: itself (a ``step_NNNNNNN`` directory),
    the latest under it (a checkpoints directory), or the latest of its ``checkpoints/``."""
    from loco.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    for d in (p, p / "checkpoints"):
        if (d / "latest").is_file():
            found = latest_checkpoint(d)
            if found is not None:
                return found
    sites = sorted(q.parent.name for q in p.glob("*/checkpoints"))
    hint = f" (a federation run: give one site's directory, e.g. {p / sites[0]})" if sites else ""
    raise ValueError(
        f"no checkpoint under {p}{hint}; give a step_NNNNNNN directory, a checkpoints directory, "
        "a run directory with checkpoints/ (run with checkpoint.every=N), or an exported file"
    )


def config_of(state: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> GPTConfig:
    """The ``GPTConfig`` of ``state`` (shapes give sizes; the head count comes from the run's
    ``model`` config section, which the shapes cannot tell)."""
    vocab, d_model = state["wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    n_head = model_cfg.get("n_head") or SIZES.get(model_cfg.get("size", ""), {}).get("n_head")
    if not n_head:
        raise ValueError("the checkpoint's config has no model.n_head nor a known model.size")
    return GPTConfig(
        vocab_size=vocab,
        seq_len=state["wpe.weight"].shape[0],
        n_layer=n_layer,
        n_head=int(n_head),
        d_model=d_model,
        mlp_ratio=state["blocks.0.mlp.fc.weight"].shape[0] // d_model,
        bias="blocks.0.attn.qkv.bias" in state,
    )


def from_checkpoint(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The model of checkpoint ``path`` (see :func:`resolve_checkpoint`) and its metadata."""
    from loco.checkpoint import model_state_dict, read_manifest

    ck = resolve_checkpoint(path)
    manifest = read_manifest(ck)
    state = model_state_dict(ck)
    cfg = config_of(state, manifest.get("config", {}).get("model", {}))
    model = GPT(cfg)
    model.load_state_dict(state)
    meta = {k: manifest.get(k) for k in ("run_id", "site", "step")}
    meta["source"] = str(ck)
    return model.eval(), meta


def export(model: GPT, out: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out`` (safetensors, or a torch file when it ends in ``.pt``)."""
    return save_weights(model.cfg, model.state_dict(), out, meta)


def save_weights(cfg: GPTConfig, weights: dict[str, torch.Tensor], out: str | Path,
                 meta: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write the named ``weights`` of a GPT with config ``cfg`` as :func:`export` does."""
    out = Path(out)
    state = {k: v.detach().float().contiguous() for k, v in weights.items()}
    state.pop(TIED, None)
    info = {
        "format": FORMAT,
        "gpt_config": json.dumps(dataclasses.asdict(cfg)),
        **{k: str(v) for k, v in (meta or {}).items() if v is not None},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save({"metadata": info, "state_dict": state}, out)
    else:
        from safetensors.torch import save_file

        save_file(state, str(out), metadata=info)
    return out


def load_exported(path: str | Path) -> tuple[GPT, dict[str, str]]:
    """The model of an exported file and its metadata."""
    path = Path(path)
    if path.suffix == ".pt":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info, state = blob["metadata"], blob["state_dict"]
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
        state = load_file(str(path))
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model exported by loco.export (no {FORMAT} metadata)")
    model = GPT(GPTConfig(**json.loads(info["gpt_config"])))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {TIED} or unexpected:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}; re-export it")
    return model.eval(), info


def load_model(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """A model from an exported file or from a checkpoint / checkpoints dir / run dir."""
    p = Path(path)
    if p.is_file():
        return load_exported(p)
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    return from_checkpoint(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loco.export", description=__doc__.split("\n")[0])
    ap.add_argument("source", help="a step_NNNNNNN checkpoint, a checkpoints dir or a run dir")
    ap.add_argument("out", nargs="?", help="output file (default: <run dir>/model.safetensors)")
    args = ap.parse_args(argv)
    try:
        model, meta = from_checkpoint(args.source)
        ck = Path(meta["source"])
        out = Path(args.out) if args.out else ck.parent.parent / "model.safetensors"
        export(model, out, meta)
    except ValueError as e:
        print(f"loco.export: error: {e}", file=sys.stderr)
        return 2
    n = model.num_params()
    print(f"loco.export: {out}: {n:,} parameters from {ck} (step {meta.get('step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
