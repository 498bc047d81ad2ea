"""Export a trained model: ``python -m loco.export SOURCE [OUT] [--format loco|hf]``.

SOURCE is a checkpoint, a checkpoints directory, a run directory or an exported file.
``--format loco`` (the default) writes one safetensors file (``.pt``: a torch file) of the full
model: every tensor of ``loco.model.GPT``'s ``state_dict`` by name and shape (the output head is
tied to ``wte.weight`` and stored once), fp32, with the architecture (``GPTConfig``) and the
source (run id, site, step) as metadata, and a BPE tokenizer's file as metadata ``tokenizer``.
:func:`load_model` reads it back, or reads a checkpoint directly. ``--format hf`` writes a
Hugging Face GPT-2 directory (:mod:`loco.hf`). A mistake is one line ``loco.export: error: ...``
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from loco.data.tokenizer import RUN_FILE, Tokenizer, byte_tokenizer, from_json
from loco.data.tokenizer import load as load_tokenizer
from loco.model import GPT, MODEL_SIZES
from loco.model.gpt import GPTConfig
from loco.model.moe_gpt import model_of_state

FORMAT = "loco-gpt"
TIED = "head.weight"  # same tensor as wte.weight
FORMATS = ("loco", "hf")  # --format: this module's file, or a Hugging Face directory


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
    n_head = model_cfg.get("n_head") or MODEL_SIZES.get(model_cfg.get("size", ""), {}).get("n_head")
    if not n_head:
        raise ValueError("the checkpoint's config has no model.n_head nor a known model.size")
    return GPTConfig(
        vocab_size=vocab,
        seq_len=state["wpe.weight"].shape[0],
        n_layer=n_layer,
        n_head=int(n_head),
        d_model=d_model,
        mlp_ratio=_mlp_width(state) // d_model,
        bias="blocks.0.attn.qkv.bias" in state,
    )


def _mlp_width(state: dict[str, torch.Tensor]) -> int:
    """The MLP's hidden width: block 0's dense MLP, or its experts' (an MoE block)."""
    if "blocks.0.mlp.fc.weight" in state:
        return state["blocks.0.mlp.fc.weight"].shape[0]
    return state["blocks.0.mlp.experts.fc_weight"].shape[2]


def _checkpoint(path: str | Path) -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """The model of checkpoint ``path``, its metadata and the run's configuration."""
    from loco.checkpoint import model_state_dict, read_manifest

    ck = resolve_checkpoint(path)
    manifest = read_manifest(ck)
    state = model_state_dict(ck)
    config = manifest.get("config")
    config = config if isinstance(config, dict) else {}
    cfg = config_of(state, config.get("model") or {})
    model = model_of_state(cfg, state, (config.get("model") or {}).get("moe"))
    model.load_state_dict(state)
    meta = {k: manifest.get(k) for k in ("run_id", "site", "step")}
    meta["source"] = str(ck)
    return model.eval(), meta, config


def from_checkpoint(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The model of checkpoint ``path`` (see :func:`resolve_checkpoint`) and its metadata."""
    model, meta, _ = _checkpoint(path)
    return model, meta


def run_tokenizer(ck: Path, data_cfg: Any) -> Tokenizer | None:
    """The tokenizer of the run that wrote checkpoint ``ck`` (``data_cfg``: its ``data``
    config): bytes, the BPE copied into its run directory, or None (a .bin corpus)."""
    data_cfg = data_cfg if isinstance(data_cfg, dict) else {}
    if data_cfg.get("source") == "bin":
        return None
    kind = data_cfg.get("tokenizer", "bytes")
    if kind == "bytes":
        return byte_tokenizer()
    for d in (ck, ck.parent, ck.parent.parent):
        if (d / RUN_FILE).is_file():
            return load_tokenizer(d / RUN_FILE)
    raise ValueError(
        f"the run used data.tokenizer={str(kind)[:20]}, but its {RUN_FILE} is not in the run "
        f"directory {ck.parent.parent}; copy it there or give --tokenizer FILE"
    )


def file_tokenizer(path: Path, info: dict[str, str], cfg: GPTConfig) -> Tokenizer | None:
    """The tokenizer of exported file ``path``: its metadata's, else a run's copy beside it,
    else bytes for a vocabulary of 256, else None (unknown)."""
    if "tokenizer" in info:
        raw = info["tokenizer"]
        if not isinstance(raw, str):
            raise ValueError(f"{path}: its metadata tokenizer is not text; re-export it")
        return from_json(raw.encode(), f"{path} (metadata tokenizer)")
    if (path.parent / RUN_FILE).is_file():
        return load_tokenizer(path.parent / RUN_FILE)
    return byte_tokenizer() if cfg.vocab_size == 256 else None


def load_run(source: str | Path, tokenizer: str | Path | None = None
             ) -> tuple[GPT, dict[str, Any], Tokenizer | None]:  # fmt: skip
    """The model, metadata and tokenizer (None: unknown) of an exported file or a checkpoint;
    ``tokenizer``: a tokenizer file to use instead of the one the source names."""
    p = Path(source)
    if p.is_file():
        model, info = load_exported(p)
        meta: dict[str, Any] = {k: info.get(k) for k in ("run_id", "site", "step", "source")}
        tok = None if tokenizer else file_tokenizer(p, info, model.cfg)
    elif not p.exists():
        raise ValueError(f"{p} does not exist")
    else:
        model, meta, config = _checkpoint(p)
        tok = None if tokenizer else run_tokenizer(Path(meta["source"]), config.get("data"))
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's "
                         f"{model.cfg.vocab_size}: it is not this model's")  # fmt: skip
    return model, meta, tok


def export(model: GPT, out: str | Path, meta: dict[str, Any] | None = None,
           tokenizer: Tokenizer | None = None) -> Path:  # fmt: skip
    """Write ``model`` to ``out`` (safetensors, or a torch file when it ends in ``.pt``)."""
    return save_weights(model.cfg, model.state_dict(), out, meta, tokenizer,
                        moe=getattr(model, "moe", None))  # fmt: skip


def save_weights(cfg: GPTConfig, weights: dict[str, torch.Tensor], out: str | Path,
                 meta: dict[str, Any] | None = None,
                 tokenizer: Tokenizer | None = None, moe: Any = None) -> Path:  # fmt: skip
    """Write the named ``weights`` of a GPT with config ``cfg`` as :func:`export` does; a BPE
    ``tokenizer`` goes into the metadata (byte tokens need none), and so do an MoE model's
    options ``moe`` (``loco.model.MoEOptions``)."""
    out = Path(out)
    state = {k: v.detach().float().contiguous() for k, v in weights.items()}
    state.pop(TIED, None)
    info = {
        "format": FORMAT,
        "gpt_config": json.dumps(dataclasses.asdict(cfg)),
        **{k: str(v) for k, v in (meta or {}).items() if v is not None},
    }
    if moe is not None:
        info["moe_config"] = json.dumps(dataclasses.asdict(moe))
    if tokenizer is not None and tokenizer.kind != "bytes":
        info["tokenizer"] = tokenizer.to_json().decode()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save({"metadata": info, "state_dict": state}, out)
    else:
        from safetensors.torch import save_file

        save_file(state, str(out), metadata=info)
    return out


def _read_exported(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        if path.suffix == ".pt":
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return blob["metadata"], blob["state_dict"]
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
        return info, load_file(str(path))
    except Exception as e:  # a file that is not one: safetensors, pickle and key errors
        raise ValueError(f"{path} is not a readable exported model ({str(e)[:120]})") from None


def load_exported(path: str | Path) -> tuple[GPT, dict[str, str]]:
    """The model of an exported file and its metadata."""
    path = Path(path)
    info, state = _read_exported(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model exported by loco.export (no {FORMAT} metadata)")
    try:
        cfg = GPTConfig(**json.loads(info["gpt_config"]))
        model = model_of_state(cfg, state, json.loads(info.get("moe_config", "null")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: bad gpt_config metadata ({str(e)[:120]}); re-export it"
        ) from None
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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ``<tag>: error: ...``, exit 2."""

    def __init__(self, tag: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.tag = tag

    def error(self, message: str) -> NoReturn:
        print(f"{self.tag}: error: {message}", file=sys.stderr)
        sys.exit(2)


def default_out(source: str | Path, meta: dict[str, Any], fmt: str) -> Path:
    """Where an export goes without OUT: beside the run's checkpoints, or beside the file."""
    src = Path(source)
    base = src.parent if src.is_file() else Path(meta["source"]).parent.parent
    if fmt == "hf":
        return base / "hf"
    if src.is_file():
        raise ValueError(f"{src} is an exported file already; give OUT (e.g. model.pt)")
    return base / "model.safetensors"


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser("loco.export", prog="python -m loco.export",
                       description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("source", help="a step_NNNNNNN checkpoint, a checkpoints dir, a run dir or "
                    "an exported file")  # fmt: skip
    ap.add_argument("out", nargs="?", help="output (default: <run dir>/model.safetensors; "
                    "--format hf: the directory <run dir>/hf)")  # fmt: skip
    ap.add_argument("--format", choices=FORMATS, default="loco", help="loco: one safetensors "
                    "(or .pt) file; hf: a Hugging Face GPT-2 directory")  # fmt: skip
    ap.add_argument("--tokenizer", help=f"the run's tokenizer file ({RUN_FILE}) when it is not "
                    "in the run directory")  # fmt: skip
    args = ap.parse_intermixed_args(argv)  # RUN --format hf OUT: OUT after an option
    try:
        model, meta, tok = load_run(args.source, args.tokenizer)
        out = Path(args.out) if args.out else default_out(args.source, meta, args.format)
        if args.format == "hf":
            from loco.hf import save_hf

            save_hf(model, out, tok, meta)
        else:
            export(model, out, meta, tok)
    except ValueError as e:
        print(f"loco.export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"loco.export: error: cannot write {e.filename}: {e.strerror or e}; choose "
              "another OUT", file=sys.stderr)  # fmt: skip
        return 2
    n = model.num_params()
    what = f"{tok.kind} tokenizer" if tok else "no tokenizer"
    src = meta.get("source") or args.source
    print(f"loco.export: {out}: {n:,} parameters, {what}, from {src} (step {meta.get('step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
