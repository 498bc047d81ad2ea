"""The end of a site's run: ``summary.json`` (what ``loco.federation`` and the report read) and
the final model ``model.safetensors`` (the format of ``python -m loco.export``).

``summary.json`` holds the trainer's figures, the outer loop's (rounds, bytes beside DDP's,
utilization, consensus) and ``final_params_crc32``: the CRC-32 of the exact bytes of the final
fp32 flat parameter vector, so two runs or two sites ended on the same parameters iff their CRCs
are equal. Both the CRC and the model file are written for models up to ``FINAL_PARAMS_MAX``
parameters (the whole vector is gathered on every rank).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

from loco.config import LocoConfig

FINAL_PARAMS_MAX = 50_000_000  # gather the final fp32 flat vector up to this many parameters
MODEL_FILE = "model.safetensors"  # the final model in a site's run directory


def outer_summary(cfg: LocoConfig, outer: Any, steps: int) -> dict[str, Any]:
    """Outer-loop figures of a run of ``steps`` inner steps: rounds, bytes beside DDP's,
    utilization, consensus. The closing syncs (``closing``) count in neither ``rounds`` nor
    ``rounds_dropped``; ``closing_dropped`` counts those that were dropped."""
    hist = outer.history  # one record per round, or per fragment's sync (``fragment``)
    return {
        "outer": cfg.outer.method,
        "codec": cfg.compression.codec if cfg.outer.method != "local" else "none",
        # a fragment's closing sync of its tail (``closing``) is not a round of the run
        "rounds": len({h["round"] for h in hist if not h.get("closing")}),
        "rounds_dropped": len({h["round"] for h in hist if h["dropped"] and not h.get("closing")}),
        "closing_dropped": sum(1 for h in hist if h["dropped"] and h.get("closing")),
        "bytes_sent": outer.totals["bytes_sent"],
        "bytes_recv": outer.totals["bytes_recv"],
        # DDP all-reduces about 2 x 4 bytes per parameter per inner step (ring, fp32)
        "ddp_bytes": 8.0 * outer.flat.numel * steps,
        "compute_utilization": utilization(hist),
        # the final average (outer.final_average): sites averaged, their distance before it
        "final_average_n": outer.final["n"] if outer.final else None,
        "final_average_distance": outer.final["consensus_distance"] if outer.final else None,
        "consensus_distance": last_distance(hist),
    }


def utilization(hist: list[dict[str, Any]]) -> float:
    """The run's compute utilization: the records' figures weighted by their windows (the
    fragments' closing syncs at the last step are short windows), the plain mean where a
    record has no window; 1.0 without records."""
    if not hist:
        return 1.0
    wins = [h.get("window_seconds") or 0.0 for h in hist]
    if min(wins) <= 0:
        return sum(h["compute_utilization"] for h in hist) / len(hist)
    return sum(h["compute_utilization"] * w for h, w in zip(hist, wins, strict=True)) / sum(wins)


def last_distance(hist: list[dict[str, Any]]) -> float | None:
    """The consensus distance of the last round that measured one: its record's, or with
    fragments the RMS over its fragments' syncs (fragments are of equal size)."""
    got = [h for h in hist if h["consensus_distance"] is not None]
    if not got:
        return None
    last = [h["consensus_distance"] for h in got if h["round"] == got[-1]["round"]]
    return last[0] if len(last) == 1 else (sum(d * d for d in last) / len(last)) ** 0.5


def final_params(outer: Any) -> torch.Tensor | None:
    """The final fp32 flat vector (length P, CPU) on every rank, or None above
    ``FINAL_PARAMS_MAX``. Collective: every rank of the site calls it."""
    return outer.flat.full() if outer.flat.numel <= FINAL_PARAMS_MAX else None


def params_crc32(flat: torch.Tensor) -> int:
    """CRC-32 of the exact bytes of ``flat`` (fp32, C order): equal iff bitwise equal."""
    return zlib.crc32(flat.detach().float().cpu().contiguous().numpy().tobytes())


def write_final_model(run_dir: Path, engine: Any, model: Any, flat: torch.Tensor,
                      meta: dict[str, Any]) -> Path:  # fmt: skip
    """Write ``flat`` (the final parameters in ``engine.layout`` order) as ``run_dir/MODEL_FILE``
    in ``loco.export``'s format (``loco.export.load_model`` reads it back)."""
    from loco.export import save_weights

    # own storage per tensor: safetensors refuses tensors that share memory
    state = {k: v.clone() for k, v in engine.layout.unflatten(flat).items()}
    return save_weights(
        model.cfg, state, run_dir / MODEL_FILE, meta, moe=getattr(model, "moe", None)
    )


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``run_dir/summary.json``: the run's summary, indented, one trailing newline."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of ``run_dir``. Raises OSError or ValueError when it is missing or
    unreadable (a site that did not finish)."""
    return json.loads((run_dir / "summary.json").read_text())
