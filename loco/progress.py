"""A console progress bar: step, loss, tokens/s and time left, on one redrawn line."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Redraws one line on a terminal; on a pipe or file prints one line per update instead."""

    def __init__(
        self, total: int, *, prefix: str = "", stream: TextIO | None = None, width: int = 24
    ) -> None:
        self.total, self.prefix, self.width = total, prefix, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.start_step: int | None = None

    def update(self, step: int, **figures: float) -> None:
        if self.start_step is None:
            self.start_step = step - 1
            self.t0 = time.monotonic()
        done = step - self.start_step
        elapsed = time.monotonic() - self.t0
        left = elapsed / max(done, 1) * (self.total - step)
        frac = step / self.total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        figs = "  ".join(_fmt(k, v) for k, v in figures.items())
        line = f"{self.prefix}[{bar}] {step}/{self.total}  {figs}  left {_hms(left)}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an eval result, a checkpoint) that does not break the bar."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + self.prefix + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(key: str, v: float) -> str:
    if key == "tok/s":
        return f"{v / 1000:.1f}k tok/s" if v >= 1000 else f"{v:.0f} tok/s"
    if key == "lr":
        return f"lr {v:.2e}"
    return f"{key} {v:.4f}"
