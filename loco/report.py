"""The run report: ``report.md`` with three PNG plots, from the ``metrics.jsonl`` of a run.

``write_report(run_dir)`` works on a site's run directory (its own ``metrics.jsonl``) and on a
``loco.local`` federation directory (one ``<site>/metrics.jsonl`` per site). Plots: validation
loss per site against tokens (``val_loss.png``), bytes sent per round (``bytes.png``),
consensus distance per round (``consensus.png``); for mixture-of-experts runs the routing
(``moe.png``: load-balancing loss, drop fraction, busiest expert's share). matplotlib (Agg backend) draws them; without
it the report is written without plots, with one warning.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from loco.metrics import read_metrics

log = logging.getLogger(__name__)

PLOTS = ("val_loss.png", "bytes.png", "consensus.png")


def _runs(run_dir: Path) -> dict[str, Path]:
    """``{site: its run dir}``: the dir itself, or its sub-dirs holding a metrics.jsonl."""
    if (run_dir / "metrics.jsonl").exists():
        recs = read_metrics(run_dir / "metrics.jsonl")
        site = recs[0]["site"] if recs else run_dir.name
        return {site: run_dir}
    return {p.parent.name: p.parent for p in sorted(run_dir.glob("*/metrics.jsonl"))}


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in records if r.get(y) is not None and r.get(x) is not None]
    pts = [(a, b) for a, b in pts if isinstance(b, (int, float)) and math.isfinite(b)]
    return [a for a, _ in pts], [b for _, b in pts]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: report.md has no plots (pip install matplotlib)",
            stacklevel=3,
        )
        return None
    return plt


def _plot(plt, path: Path, title: str, xlabel: str, ylabel: str, lines: dict, log_y=False):
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    drawn = False
    for label, (xs, ys) in lines.items():
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=label)
            drawn = True
    if drawn:
        ax.legend()
        if log_y and all(y > 0 for _, ys in lines.values() for y in ys):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row(site: str, d: Path, evals: list, outers: list) -> list[str]:
    try:
        s = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        s = {}
    val = s.get("val_loss", evals[-1]["loss"] if evals else None)
    dist = [r["consensus_distance"] for r in outers if r.get("consensus_distance") is not None]
    sent = sum(r.get("bytes_sent") or 0 for r in outers)
    return [
        site,
        str(s.get("steps", evals[-1]["step"] if evals else "-")),
        f"{val:.4f}" if val is not None else "-",
        str(len({r.get("round") for r in outers})),  # with fragments: a record per sync
        f"{sent / 1e6:.2f} MB",
        f"{dist[-1]:.3g}" if dist else "-",
    ]


MOE_PLOT = "moe.png"  # only for mixture-of-experts runs


def _moe_lines(runs: dict[str, Path]) -> dict[str, tuple[list, list]]:
    """Per site: the load-balancing loss, the drop fraction and the busiest expert's share of
    the tokens against the step (MoE runs' ``train`` records; empty for dense runs)."""
    lines: dict[str, tuple[list, list]] = {}
    for s, d in runs.items():
        recs = [r for r in read_metrics(d / "metrics.jsonl", "train") if "moe_drop_frac" in r]
        for r in recs:
            r["moe_load_max"] = max(v for k, v in r.items() if k.startswith("moe_load_"))
        for key, what in (("moe_aux_loss", "aux loss"), ("moe_drop_frac", "drop fraction"),
                          ("moe_load_max", "busiest expert's share")):  # fmt: skip
            if recs:
                lines[f"{s} {what}"] = _series(recs, "step", key)
    return lines


def write_report(run_dir: str | Path, title: str | None = None) -> Path | None:
    """Write ``run_dir/report.md`` and its PNGs; returns its path (None: no metrics here)."""
    run_dir = Path(run_dir)
    runs = _runs(run_dir)
    if not runs:
        return None
    evals = {s: read_metrics(d / "metrics.jsonl", "eval") for s, d in runs.items()}
    outers = {s: read_metrics(d / "metrics.jsonl", "outer") for s, d in runs.items()}
    rows = [_row(s, runs[s], evals[s], outers[s]) for s in runs]
    head = ["site", "steps", "final val loss", "rounds", "bytes sent", "last consensus distance"]
    lines = [f"# {title or 'loco run report'}", "", f"Sites: {', '.join(runs)}.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    plt = _pyplot()
    if plt is not None:
        _plot(plt, run_dir / PLOTS[0], "validation loss", "tokens (per site)", "loss",
              {s: _series(e, "tokens", "loss") for s, e in evals.items()})  # fmt: skip
        _plot(plt, run_dir / PLOTS[1], "bytes sent per round", "round", "bytes (site total)",
              {s: _series(o, "round", "bytes_sent") for s, o in outers.items()})  # fmt: skip
        _plot(plt, run_dir / PLOTS[2], "consensus distance (RMS to the pulled phi)", "round",
              "distance", {s: _series(o, "round", "consensus_distance")
                           for s, o in outers.items()}, log_y=True)  # fmt: skip
        for name, what in zip(PLOTS, ("Validation loss", "Bytes per round", "Consensus distance"),
                              strict=True):  # fmt: skip
            lines += [f"## {what}", "", f"![{what}]({name})", ""]
        moe = _moe_lines(runs)
        if moe:
            _plot(plt, run_dir / MOE_PLOT, "experts: routing (train records)", "step", "value", moe)
            lines += ["## Experts", "", f"![Experts]({MOE_PLOT})", ""]
    else:
        lines.append("(no plots: matplotlib is not installed)")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def try_write_report(run_dir: str | Path, title: str | None = None) -> Path | None:
    """:func:`write_report`, but a failure is one logged warning: a report never fails a run."""
    try:
        return write_report(run_dir, title)
    except Exception as e:  # noqa: BLE001
        log.warning("report: could not write %s/report.md: %s", run_dir, e)
        return None
