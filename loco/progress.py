"""A console progress bar: step, loss, tokens/s and time left.

On a terminal the bar is ``rich.progress``: rich is already what draws the end-of-run tables
(``loco.federation.print_table``), so one library covers both, and its console prints other
lines *above* a live bar, which tqdm leaves to the caller. It refreshes only on ``update``
(no refresh thread in the training process). On a pipe or a file (a worker's log) every update
is one plain line without control characters, so logs stay greppable.
"""

from __future__ import annotations

import atexit
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Redraws one bar on a terminal; on a pipe or file prints one line per update instead.

    ``update(step, **figures)`` shows ``step/total``, the figures and the time left (from the
    pace since the first update, so a resumed run estimates from its own steps);
    ``message(text)`` prints a line of its own; ``close()`` ends the bar.
    """

    def __init__(
        self, total: int, *, prefix: str = "", stream: TextIO | None = None, width: int = 24
    ) -> None:
        self.total, self.prefix, self.width = total, prefix, width
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.start_step: int | None = None
        console = Console(file=self.stream, highlight=False) if self.stream.isatty() else None
        self.tty = console is not None and console.is_interactive  # not TERM=dumb
        self._bar = _Bar(console, prefix, width) if console is not None and self.tty else None

    def update(self, step: int, **figures: float) -> None:
        if self.start_step is None:
            self.start_step = step - 1
            self.t0 = time.monotonic()
        done = step - self.start_step
        left = (time.monotonic() - self.t0) / max(done, 1) * (self.total - step)
        info = f"{step}/{self.total}  {'  '.join(_fmt(k, v) for k, v in figures.items())}"
        info += f"  left {_hms(left)}"
        if self._bar is not None:
            self._bar.show(step, self.total, info)
            return
        filled = int(step / self.total * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"{self.prefix}[{bar}] {info}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an eval result, a checkpoint) that does not break the bar."""
        if self._bar is not None:
            self._bar.print(self.prefix + text)
            return
        self.stream.write(self.prefix + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Leave the last bar on screen and end its line (idempotent)."""
        if self._bar is not None:
            self._bar.stop()


class _Bar:
    """rich's live bar on ``console``, started at the first ``show`` and stopped at exit too
    (a crashed run leaves no half-drawn line and no redirected ``sys.stderr``)."""

    def __init__(self, console: Console, prefix: str, width: int) -> None:
        own = console.file in (sys.stdout, sys.stderr)
        self.console, self.prefix = console, prefix
        self.rich = RichProgress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=width),
            TextColumn("{task.fields[info]}", markup=False),
            console=console,
            auto_refresh=False,
            # other prints to the process's stdout/stderr go above the bar, not through it
            redirect_stdout=own,
            redirect_stderr=own,
        )
        self.task: TaskID | None = None
        self.live = False

    def show(self, step: int, total: int, info: str) -> None:
        if self.task is None:
            self.task = self.rich.add_task(
                self.prefix.rstrip(), total=total, completed=step, info=info
            )
        self.rich.update(self.task, completed=step, info=info)
        if self.live:
            self.rich.refresh()
            return
        self.rich.start()  # draws the bar
        self.console.show_cursor(True)  # rich hides it: a killed run would leave it hidden
        self.live = True
        atexit.register(self.stop)

    def print(self, line: str) -> None:
        self.console.print(Text(line))

    def stop(self) -> None:
        if self.live:
            self.live = False
            atexit.unregister(self.stop)
            self.rich.stop()


def _fmt(key: str, v: float) -> str:
    if key == "tok/s":
        return f"{v / 1000:.1f}k tok/s" if v >= 1000 else f"{v:.0f} tok/s"
    if key == "lr":
        return f"lr {v:.2e}"
    return f"{key} {v:.4f}"
