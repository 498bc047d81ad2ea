"""The result table of a ``python -m loco.local -m ...`` sweep: one row per job (a federation).

Each job's row: its overrides, final validation loss per site and their mean, bytes sent by all
sites, what DDP would have sent, wall time, and the final consensus distance (mean over the
sites of the RMS distance of each site's final parameters from their mean). ``write_sweep``
writes ``sweep.csv``, ``sweep.md`` and ``sweep.png`` (mean val loss against bytes sent, one
point per job) into the sweep directory.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def sweep_row(overrides: list[str], res: dict[str, Any]) -> dict[str, Any]:
    """The row of one job from ``run_federation``'s result."""
    sites = res["sites"]
    vals = [r["val_loss"] for r in sites if r.get("val_loss") is not None]
    dists = [r["final_distance"] for r in sites if r.get("final_distance") is not None]
    row: dict[str, Any] = {"job": " ".join(overrides) or "(defaults)"}
    for r in sites:
        row[f"val_loss_{r['site']}"] = r.get("val_loss")
    row.update(
        val_loss_mean=sum(vals) / len(vals) if vals else None,
        bytes_sent=sum(r.get("bytes_sent") or 0 for r in sites),
        ddp_bytes=sum(r.get("ddp_bytes") or 0 for r in sites),
        wall_s=res["wall_s"],
        consensus_distance=sum(dists) / len(dists) if dists else None,
        failed=",".join(r["site"] for r in sites if r.get("exit") != 0),
    )
    return row


@dataclass
class Sweep:
    """The state of one ``python -m loco.local -m`` sweep (its jobs run in this process): one row
    per job and the multirun's sweep directory, where :meth:`write` puts the table."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dir: Path | None = None

    def add(self, overrides: list[str], res: dict[str, Any], sweep_dir: Path) -> None:
        """Record the job of ``overrides`` with ``run_federation``'s result ``res``."""
        self.rows.append(sweep_row(overrides, res))
        self.dir = sweep_dir

    def write(self) -> str:
        """Write the table files (see :func:`write_sweep`) and return the table text."""
        return write_sweep(self.rows, self.dir if self.dir is not None else Path("."))


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def write_sweep(rows: list[dict[str, Any]], out_dir: str | Path) -> str:
    """Write ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``out_dir``; returns the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    text = f"# sweep: {len(rows)} jobs\n\n{table}\n"
    if _plot(rows, out / "sweep.png"):
        text += "\n![mean final validation loss against bytes sent](sweep.png)\n"
    (out / "sweep.md").write_text(text)
    return table + f"\n(sweep.csv, sweep.md, sweep.png in {out})"


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no sweep.png", stacklevel=2)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, r in enumerate(rows):
        if r.get("val_loss_mean") is None:
            continue
        x = (r.get("bytes_sent") or 0) / 1e6
        ax.scatter([x], [r["val_loss_mean"]], label=f"{i}: {r['job']}"[:70])
        ax.annotate(str(i), (x, r["val_loss_mean"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("bytes sent by all sites (MB)")
    ax.set_ylabel("mean final validation loss")
    ax.set_title(f"sweep: {len(rows)} jobs")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
