"""Generate text: ``python -m loco.sample <checkpoint | run dir | exported file> --prompt "def "``.

The tokenizer is the run's (``data.tokenizer``): bytes (vocabulary 256), or the byte-level BPE
the run trained (its file in the run directory, or in the exported file's metadata; or
``--tokenizer FILE``). The prompt is encoded as UTF-8 and the output decoded with replacement
characters for incomplete sequences. Sampling uses the model's KV cache; ``--temperature 0`` is
greedy and deterministic, otherwise ``--seed`` fixes the draw. A mistake is one line
``loco.sample: error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys

import torch

from loco.data.tokenizer import RUN_FILE, Tokenizer, byte_tokenizer
from loco.export import OneLineParser, load_run


def sample(
    model,
    prompt: str,
    *,
    tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    tokenizer: Tokenizer | None = None,
) -> str:
    """``prompt`` followed by ``tokens`` generated tokens, decoded with ``tokenizer`` (None:
    bytes, for a model whose vocabulary is 256)."""
    if tokenizer is None and model.cfg.vocab_size != 256:
        raise ValueError(
            f"the model's vocabulary has {model.cfg.vocab_size} tokens and its tokenizer is "
            f"unknown (a .bin corpus, or no {RUN_FILE} beside it); give --tokenizer FILE"
        )
    tok = tokenizer or byte_tokenizer()
    if tokens < 0:
        raise ValueError(f"--tokens={tokens} must be >= 0")
    ids = tok.encode(prompt) or [tok.byte_id(ord("\n"))]
    idx = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser("loco.sample", prog="python -m loco.sample",
                       description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("source", help="a checkpoint, checkpoints dir, run dir or exported file")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40, help="0: no top-k cut")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer", help=f"a tokenizer file ({RUN_FILE}) to use instead of the run's"
    )
    args = ap.parse_args(argv)
    try:
        model, _, tok = load_run(args.source, args.tokenizer)
        text = sample(model, args.prompt, tokens=args.tokens, temperature=args.temperature,
                      top_k=args.top_k or None, seed=args.seed, tokenizer=tok)  # fmt: skip
    except ValueError as e:
        print(f"loco.sample: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
