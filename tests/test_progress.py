"""The console: the progress bar on a pipe and on a terminal, and the federation's table."""

from __future__ import annotations

import io
import re

import pytest

from loco.federation import print_table, table
from loco.progress import Progress


class Terminal(io.StringIO):
    """A stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal_env(monkeypatch):
    """A plain terminal, whatever the environment running the tests says."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def drive(stream: io.StringIO) -> None:
    p = Progress(10, prefix="loco[eu] ", stream=stream)
    for step in range(1, 11):
        p.update(step, loss=2.0 + step / 100, lr=3e-3, **{"tok/s": 12_345.0})
        if step == 5:
            p.message("eval step 5: val loss 1.2345")
    p.close()


def test_pipe_gets_one_plain_line_per_update():
    out = io.StringIO()
    drive(out)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 11  # ten updates and the message
    assert lines[5] == "loco[eu] eval step 5: val loss 1.2345"
    updates = lines[:5] + lines[6:]
    for step, line in enumerate(updates, start=1):
        assert line.startswith("loco[eu] ["), line
        assert f" {step}/10 " in line and f"loss {2.0 + step / 100:.4f}" in line, line
        assert "lr 3.00e-03" in line and "12.3k tok/s" in line and "left " in line, line


def test_terminal_gets_a_redrawn_bar(terminal_env):
    out = Terminal()
    drive(out)
    text = out.getvalue()
    assert "\x1b" in text and "\r" in text  # drawn in place, not line after line
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert plain.count("\n") == 2  # the message's line and the bar's last line
    assert "10/10" in plain and "loss 2.1000" in plain and "12.3k tok/s" in plain
    assert "loss 2.0500" in plain  # the bar was drawn at every update, not only at the end
    # the message is a whole line of its own, with the bar redrawn after it
    lines = [seg for line in plain.split("\n") for seg in line.split("\r")]
    assert "loco[eu] eval step 5: val loss 1.2345" in lines
    assert plain.rstrip("\n").split("\r")[-1].startswith("loco[eu]")


def test_dumb_terminal_falls_back_to_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    out = Terminal()
    drive(out)
    assert "\x1b" not in out.getvalue() and len(out.getvalue().splitlines()) == 11


ROWS = [
    {"site": "eu", "exit": 0, "steps": 20, "val_loss": 2.5, "rounds": 4, "rounds_dropped": 0,
     "bytes_sent": 1e6, "ddp_bytes": 8e7, "compute_utilization": 0.95, "final_distance": 1e-3},
    {"site": "us", "exit": 3, "steps": 12, "val_loss": None},
    {"site": "[bold]sa", "exit": -9},
]  # fmt: skip


def test_table_lists_every_site_plain_and_rich(terminal_env):
    plain = io.StringIO()
    print_table(ROWS, file=plain)
    assert plain.getvalue() == table(ROWS) + "\n"
    rich_out = Terminal()
    print_table(ROWS, file=rich_out)
    drawn = re.sub(r"\x1b\[[0-9;]*m", "", rich_out.getvalue())
    assert "\x1b[1m" in rich_out.getvalue() and "────" in drawn  # bold head: a rich table
    for text in (plain.getvalue(), drawn):
        rows = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
        assert "2.5000" in rows["eu"] and "80x" in rows["eu"] and "95%" in rows["eu"]
        assert "3 run-time" in rows["us"]
        assert "-9 crash" in rows["[bold]sa"]  # a site name is never read as markup
