"""TensorBoard event sink: the numeric figures of metrics records as TensorBoard scalars.

``tensorboard --logdir RUN`` then shows a site's curves, or every site of a federation side by
side (one subdirectory per site). ``metrics.jsonl`` stays the contract; the events are a view.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def scalars(figures: Mapping[str, Any]) -> dict[str, float]:
    """The figures that are scalars: finite real numbers, not booleans, and not checksums
    (``*_crc``: an identifier, not a measurement)."""
    return {
        k: float(v)
        for k, v in figures.items()
        if isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and not k.endswith("_crc")
        and math.isfinite(v)
    }


class EventSink:
    """Writes one scalar per figure, tagged ``<kind>/<figure>`` (``train/loss``, ``eval/bpb``,
    ``outer/bytes_sent``), at the record's step, into TensorBoard event files in ``directory``.

    The writer opens at the first record and every record is flushed at once, so the events
    are on disk even when the run dies later. It never raises: the first error is reported as
    a warning and turns the sink off (:attr:`enabled` becomes False).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.enabled = True
        self._writer: Any = None

    def write(
        self, kind: str, step: int, figures: Mapping[str, Any], walltime: float | None = None
    ) -> int:
        """Add the scalars of one record; returns how many were written (0 when off)."""
        values = scalars(figures)
        if not self.enabled or not values:
            return 0
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.directory))
            for name, value in values.items():
                self._writer.add_scalar(f"{kind}/{name}", value, step, walltime=walltime)
            self._writer.flush()
        except Exception as e:  # the events must never stop a run
            self._fail(e)
            return 0
        return len(values)

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as e:
                self._fail(e)

    def _fail(self, e: Exception) -> None:
        if self.enabled:
            warnings.warn(
                f"TensorBoard events in {self.directory} are off: {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )
        self.enabled = False
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass  # already reported
