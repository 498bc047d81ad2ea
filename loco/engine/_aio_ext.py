"""Loader of the compiled asynchronous I/O op (``csrc/aio.cpp``, ``torch.ops.loco_aio``).

The same build policy as the codec kernels (``loco.compress._ext``): compiled on first use into
``$LOCO_EXT_DIR`` or ``~/.cache/loco/ext/<hash>`` (the hash covers the source, the torch version
and the flags), one compiler at a time across processes (a file lock), published with one rename.
A failed build means the pure-python thread path (``loco.engine.aio``) with ONE warning;
``LOCO_REQUIRE_EXT=1`` turns it into an error and ``LOCO_DISABLE_EXT=1`` skips the build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_SOURCE = "aio.cpp"
_CFLAGS = ["-O2"]
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "ops": None, "error": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _build_and_load() -> None:
    src = CSRC_DIR / _SOURCE
    h = hashlib.sha256(src.read_bytes())
    h.update(f"torch={torch.__version__};{_CFLAGS}".encode())
    tag = h.hexdigest()[:16]
    root = os.environ.get("LOCO_EXT_DIR")
    build_dir = (Path(root) if root else Path.home() / ".cache" / "loco" / "ext") / f"aio-{tag}"
    name = f"loco_aio_{tag}"
    lib = build_dir / f"{name}.so"
    if not lib.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir.parent / f"aio-{tag}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                if not lib.exists():
                    tmp = build_dir / f"tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    from torch.utils.cpp_extension import load

                    with contextlib.redirect_stdout(io.StringIO()):
                        load(name=name, sources=[str(src)], extra_cflags=_CFLAGS,
                             build_directory=str(tmp), is_python_module=False,
                             with_cuda=False, verbose=False)  # fmt: skip
                    os.replace(tmp / f"{name}.so", lib)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    torch.ops.load_library(str(lib))


def _load() -> None:
    if _flag("LOCO_DISABLE_EXT"):
        _state["error"] = "LOCO_DISABLE_EXT=1"
        return
    try:
        _build_and_load()
        _state["ops"] = torch.ops.loco_aio
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use the python path"
        _state["error"] = f"{type(e).__name__}: {e}"
        if _flag("LOCO_REQUIRE_EXT"):
            raise RuntimeError(
                f"loco: compiling csrc/{_SOURCE} failed and LOCO_REQUIRE_EXT=1 is set: "
                f"{_state['error']}"
            ) from e
        warnings.warn(
            "loco: the compiled asynchronous I/O op is unavailable, the NVMe tier uses python "
            f"threads ({_state['error'][:300]}); install a C++ compiler and ninja, or set "
            "LOCO_DISABLE_EXT=1 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


def aio_ops() -> Any | None:
    """``torch.ops.loco_aio`` once compiled and loaded, else None (the python thread path)."""
    if not _state["loaded"]:
        with _lock:
            if not _state["loaded"]:
                try:
                    _load()
                finally:
                    _state["loaded"] = True
    return _state["ops"]


def aio_error() -> str | None:
    """Why the compiled op is not in use, or None when it is."""
    aio_ops()
    return _state["error"]
