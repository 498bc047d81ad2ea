"""Exit statuses (loco/errors.py): 2 only for configuration mistakes, before any work; 3 for a
run-time failure loco explains in one line; 1 with a traceback for anything unexpected.

A bad key exiting 2 before any run dir is tests/test_config.py::test_cli_error_is_one_line_...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loco.checkpoint import CheckpointError
from loco.config import ConfigError
from loco.dist import free_port
from loco.errors import (
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_RUN,
    JoinError,
    RankExited,
    TrainingError,
    describe,
    exit_status,
)
from loco.federation import table
from loco.rank import config_checks
from loco.trainer import check_finite
from tests.workers import ROOT, run_worker

TINY = [
    "+site=eu",
    "model=tiny",
    "train.steps=3",
    "train.seq_len=32",
    "train.batch_size=2",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "train.progress=false",
    "train.threads=1",
]
LOCAL = [*TINY, "outer=local"]
DIVERGE = [*LOCAL, "optim=sgd", "train.lr=1e30", "train.warmup_steps=0"]


def _err_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("loco: ")]


def assert_run_failure(p: subprocess.CompletedProcess, words: str) -> None:
    """Exit 3, no traceback, and the cause as one ``loco: failed:`` line."""
    assert p.returncode == EXIT_RUN, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = _err_lines(p)
    assert lines and all(ln.startswith("loco: failed: ") for ln in lines), p.stderr[-3000:]
    assert words in lines[-1], lines


# ------------------------------------------------------------------ the table and its pieces


def test_statuses_classify_failures():
    assert exit_status(ConfigError("x")) == EXIT_CONFIG == 2
    for e in (TrainingError("x"), JoinError("x"), CheckpointError("x")):
        assert exit_status(e) == EXIT_RUN == 3, e
    assert exit_status(ValueError("x")) == exit_status(RuntimeError("x")) == EXIT_CRASH == 1
    assert exit_status(RankExited(1, 3)) == 3 and exit_status(KeyboardInterrupt()) == 130


def test_local_table_names_the_kind_of_each_failure():
    codes = {"eu": 0, "us": 2, "asia": 3, "sa": 1, "af": -9}
    text = table([{"site": s, "exit": c} for s, c in codes.items()])
    rows = {ln.split()[0]: ln for ln in text.splitlines()[2:]}
    assert rows["eu"].split()[1] == "0"
    assert "2 config" in rows["us"] and "3 run-time" in rows["asia"]
    assert "1 crash" in rows["sa"] and "-9 crash (SIGKILL)" in rows["af"]
    assert describe(130) == "130 interrupted" and describe(None) == "-"


def test_non_finite_loss_or_norm_is_a_training_error():
    check_finite(1, 2.5, 0.3, 1e-3)
    for loss, norm in ((float("nan"), 1.0), (2.0, float("inf"))):
        with pytest.raises(TrainingError, match="train.lr"):
            check_finite(7, loss, norm, 1e-3)


def test_build_phase_value_errors_are_config_errors():
    with pytest.raises(ConfigError, match="too small"), config_checks():
        raise ValueError("too small")
    with pytest.raises(CheckpointError), config_checks():  # stays a run-time failure
        raise CheckpointError("bad")


# ------------------------------------------------------------------ the real entry point


def test_configuration_checks_that_need_the_machine_exit_2_before_any_work(tmp_path):
    cases = [["resume=peer"], ["data=text", f"data.path={tmp_path / 'missing.txt'}"]]
    if not torch.cuda.is_available():
        cases.append(["site.device=cuda"])
    for extra in cases:
        p = run_worker([*LOCAL, *extra], tmp_path / "run", timeout=60)
        assert p.returncode == EXIT_CONFIG, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("loco: error: "), p.stderr
        assert extra[-1].split("=")[0] in lines[0], lines
        assert not (tmp_path / "run").exists(), "a config error must stop before any work"


def test_data_too_small_for_the_config_is_still_exit_2(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n")  # one chunk cannot fill data.num_shards=3 shards
    p = run_worker([*LOCAL, "data=text", f"data.path={small}"], tmp_path / "run", timeout=60)
    assert p.returncode == EXIT_CONFIG, p.stderr[-2000:]
    assert _err_lines(p)[-1].startswith("loco: error: ") and "data.chunk_tokens" in p.stderr


def test_resume_peer_without_a_live_member_is_a_run_time_failure(tmp_path):
    me, nobody = free_port(), free_port()
    p = run_worker(
        [*TINY, "gossip.insecure=true", f"site.listen=127.0.0.1:{me}",
         f"site.peers=['us=127.0.0.1:{nobody}']", "resume=peer", "join.timeout_s=1"],
        tmp_path, timeout=90,
    )  # fmt: skip
    assert_run_failure(p, "no live member")


def test_latest_naming_a_missing_step_is_a_run_time_failure(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000005\n")
    p = run_worker([*LOCAL, "resume=latest"], tmp_path, timeout=60)
    assert_run_failure(p, "step_0000005")


@pytest.mark.parametrize("nproc", [1, 2])
def test_non_finite_loss_is_a_run_time_failure(tmp_path, nproc):
    """A 2-rank site exits as its failing rank does (the old parent exited 1 with a traceback)."""
    p = run_worker([*DIVERGE, f"site.nproc={nproc}"], tmp_path, timeout=90)
    assert_run_failure(p, "lower train.lr")
    assert not (tmp_path / "summary.json").exists()


def test_unexpected_value_error_in_training_is_a_crash_with_traceback(tmp_path):
    """A ValueError met while training is not a configuration error: 1 and its traceback."""
    code = (
        "import runpy, sys, loco.trainer\n"
        "def boom(self, *a, **k):\n"
        "    raise ValueError('boom in training')\n"
        "loco.trainer.Trainer.fit = boom\n"
        f"sys.argv = ['loco.worker', *{LOCAL!r}, 'hydra.run.dir={tmp_path}']\n"
        "runpy.run_module('loco.worker', run_name='__main__', alter_sys=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOCO_DEBUG"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == EXIT_CRASH, p.stderr[-2000:]
    assert "Traceback" in p.stderr and "boom in training" in p.stderr
    assert not _err_lines(p), p.stderr[-2000:]


def test_readme_documents_the_table():
    text = (Path(ROOT) / "README.md").read_text()
    for row in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert row in text, row
