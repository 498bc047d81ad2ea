"""The cache of compiled extensions (``csrc/``): each library is built once per source hash into
``$LOCO_EXT_DIR`` or ``~/.cache/loco/ext/<dir>``, one compiler at a time across processes (a
file lock), in a private folder published with one rename, so an interrupted build never leaves
a broken library in the cache. Used by ``loco.compress._ext`` and ``loco.engine._aio_ext``."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

REQUIRE_EXT_ENV = "LOCO_REQUIRE_EXT"
DISABLE_EXT_ENV = "LOCO_DISABLE_EXT"
EXT_DIR_ENV = "LOCO_EXT_DIR"


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_cached(dir_name: str, name: str, compile: Callable[[Path], None]) -> None:
    """Load library ``name`` from the cache folder ``dir_name``, building it first if missing:
    ``compile(build_dir)`` must leave ``build_dir/<name>.so`` (and may load it itself)."""
    root = os.environ.get(EXT_DIR_ENV)
    build_dir = (Path(root) if root else Path.home() / ".cache" / "loco" / "ext") / dir_name
    lib = build_dir / f"{name}.so"
    if not lib.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir.parent / f"{dir_name}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # one compiler at a time across processes
            try:
                if not lib.exists():
                    tmp = build_dir / f"tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    compile(tmp)  # also loads it into this process
                    os.replace(tmp / f"{name}.so", lib)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    torch.ops.load_library(str(lib))
