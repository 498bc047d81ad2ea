"""Metrics: one JSON object a line in ``metrics.jsonl`` (the contract: docs/architecture.md)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from loco.events import EventSink

KINDS = ("train", "eval", "outer", "ckpt", "join", "serve")


class MetricsWriter:
    """Appends records ``{time, site, rank, step, round, kind, **figures}`` to a JSONL file.

    Each record is written with one ``write`` on a file opened for appending and flushed at once,
    so lines from several ranks of a site never interleave within a line. Non-finite floats are
    written as ``null`` (JSON has no NaN).

    With ``events`` (a directory), each record's numeric figures also go to TensorBoard event
    files there (:class:`loco.events.EventSink`: tag ``<kind>/<figure>`` at the record's step).
    """

    def __init__(
        self, path: str | Path, *, site: str, rank: int, events: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.site, self.rank = site, rank
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.events = EventSink(events) if events is not None else None

    def log(self, kind: str, *, step: int, round: int, **figures: Any) -> dict[str, Any]:
        assert kind in KINDS, kind
        rec = {
            "time": time.time(),
            "site": self.site,
            "rank": self.rank,
            "step": step,
            "round": round,
            "kind": kind,
        }
        for k, v in figures.items():
            rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        os.write(self._fd, (json.dumps(rec) + "\n").encode())
        if self.events is not None:
            self.events.write(kind, step, figures, walltime=rec["time"])
        return rec

    def close(self) -> None:
        """Close ``metrics.jsonl`` and flush and close the event files (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.events is not None:
            self.events.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, optionally of one kind."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
