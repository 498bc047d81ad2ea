"""The extension loader: cached load time, one warning on a failed build, env switches."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import loco.compress as lc
from loco.compress import _ext

from .helpers import ext_or_skip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader with no cached state, building into tmp_path; restored afterwards."""
    for key in ("loaded", "ops", "cuda", "error"):
        monkeypatch.setitem(_ext._state, key, {"loaded": False, "cuda": False}.get(key))
    monkeypatch.setenv(_ext.EXT_DIR_ENV, str(tmp_path / "ext"))
    monkeypatch.delenv(_ext.REQUIRE_EXT_ENV, raising=False)
    monkeypatch.delenv(_ext.DISABLE_EXT_ENV, raising=False)
    return tmp_path


def _broken_sources(monkeypatch, tmp_path: Path) -> None:
    src = tmp_path / "csrc"
    src.mkdir()
    for name in ("compress.cpp", "compress_cuda.cu", "compress.h", "compress_kernels.inc"):
        (src / name).write_text("this is not C++\n")
    monkeypatch.setattr(_ext, "CSRC_DIR", src)


def test_failed_build_warns_once_and_falls_back(fresh_loader, monkeypatch):
    _broken_sources(monkeypatch, fresh_loader)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        assert _ext.ext_ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.ext_ops() is None  # no second warning
        x = torch.randn(100)
        assert torch.equal(lc.decode(lc.encode(x, "none")), x)  # reference path works
    assert "Error" in (_ext.ext_error() or "")


def test_require_ext_turns_failure_into_error(fresh_loader, monkeypatch):
    _broken_sources(monkeypatch, fresh_loader)
    monkeypatch.setenv(_ext.REQUIRE_EXT_ENV, "1")
    with pytest.raises(RuntimeError, match="LOCO_REQUIRE_EXT"):
        _ext.ext_ops()
    with pytest.raises(RuntimeError, match="LOCO_REQUIRE_EXT"):
        _ext.ext_ops()  # every later call too


def test_disable_ext_is_silent(fresh_loader, monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_EXT_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.ext_ops() is None
        assert not lc.ext_available()


def test_cached_load_is_fast():
    ext_or_skip()  # builds into the cache of this process's environment if needed
    code = (
        "import time, torch\n"
        "t = time.perf_counter()\n"
        "from loco.compress._ext import ext_ops\n"
        "assert ext_ops() is not None\n"
        "print(time.perf_counter() - t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _ext.DISABLE_EXT_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0


@pytest.mark.slow
def test_parallel_processes_build_once(tmp_path):
    """Several ranks starting together: one compiles (file lock), all load the same library."""
    code = "from loco.compress._ext import ext_ops; assert ext_ops() is not None"
    env = {**os.environ, _ext.EXT_DIR_ENV: str(tmp_path), _ext.REQUIRE_EXT_ENV: "1"}
    env.pop(_ext.DISABLE_EXT_ENV, None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
    libs = list(tmp_path.glob("*/loco_ext_*.so"))
    assert len(libs) == 1
