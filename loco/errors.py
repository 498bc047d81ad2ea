"""Exit statuses of ``loco.worker`` (and of a site in ``loco.local``'s table), and the failures
that map to them.

=====  ============  ==========================================================================
code   kind          meaning
=====  ============  ==========================================================================
0      ok            the run finished
1      crash         an unexpected error; its traceback is printed (a bug, or a rank killed)
2      config        a configuration mistake (:class:`~loco.config.ConfigError`), found before
                     training: one line ``loco: error: ...`` naming the fix
3      run-time      a failure of the run that loco detects and explains in one line
                     ``loco: failed: ...``: a non-finite loss (:class:`TrainingError`), a
                     checkpoint that cannot be used at resume (``CheckpointError``), no live
                     member to join (:class:`JoinError`)
130    interrupted   Ctrl-C (SIGINT) or SIGTERM to ``loco.local``
=====  ============  ==========================================================================

2 is kept for configuration mistakes only, so a script may retry on 3 (after fixing the run's
state: the checkpoint, the learning rate, the members) but never on 2. 1 is Python's own status
for an uncaught exception, 130 the shell's convention for SIGINT.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
EXIT_RUN = 3
EXIT_INTERRUPTED = 130


class RunError(RuntimeError):
    """A run-time failure that loco detects; its message is one line naming the cause and fix."""


class TrainingError(RunError):
    """Training cannot go on (e.g. a non-finite loss or gradient norm)."""


class JoinError(RunError):
    """``resume=peer``: no live member served its state in time."""


class RankExited(Exception):
    """A local rank process (``site.nproc > 1``) exited with ``status``; it has already printed
    its own message, so the parent exits with the same status and prints nothing more."""

    def __init__(self, rank: int, status: int) -> None:
        super().__init__(f"rank {rank} exited with status {status} ({kind(status)})")
        self.rank, self.status = rank, status


def exit_status(e: BaseException) -> int:
    """The exit status for ``e`` per the table above (1 for anything unexpected)."""
    from loco.checkpoint.format import CheckpointError
    from loco.config import ConfigError

    if isinstance(e, RankExited):
        return e.status
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, ConfigError):
        return EXIT_CONFIG
    if isinstance(e, (RunError, CheckpointError)):
        return EXIT_RUN
    return EXIT_CRASH


def one_line(e: BaseException, status: int) -> str:
    """What the user reads for a known failure: ``loco: error: ...`` (config, 2) or
    ``loco: failed: ...`` (run-time, 3)."""
    return f"loco: {'error' if status == EXIT_CONFIG else 'failed'}: {e}"


def kind(code: int | None) -> str:
    """The kind of an exit status: ``ok``, ``config``, ``run-time``, ``interrupted``, ``crash``
    (a negative code: killed by that signal, also a crash)."""
    if code is None:
        return "running"
    return {
        EXIT_OK: "ok",
        EXIT_CONFIG: "config",
        EXIT_RUN: "run-time",
        EXIT_INTERRUPTED: "interrupted",
    }.get(code, "crash")


def describe(code: int | None) -> str:
    """An exit status with its kind for a summary table: ``0``, ``2 config``, ``3 run-time``,
    ``1 crash``, ``-9 crash (SIGKILL)``, ``130 interrupted``; ``-`` when unknown."""
    if code is None:
        return "-"
    if code == EXIT_OK:
        return "0"
    if code < 0:
        try:
            return f"{code} crash ({signal.Signals(-code).name})"
        except ValueError:
            return f"{code} crash (signal {-code})"
    return f"{code} {kind(code)}"
