"""Loader of the compiled asynchronous I/O op (``csrc/aio.cpp``, ``torch.ops.loco_aio``).

The same build policy as the codec kernels (``loco.compress._ext``): compiled on first use into
the extension cache (``loco.ext_cache``; the hash covers the source, the torch version and the
flags).
A failed build means the pure-python thread path (``loco.engine.aio``) with ONE warning;
``LOCO_REQUIRE_EXT=1`` turns it into an error and ``LOCO_DISABLE_EXT=1`` skips the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from loco.ext_cache import DISABLE_EXT_ENV, REQUIRE_EXT_ENV, env_flag, load_cached

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_SOURCE = "aio.cpp"
_CFLAGS = ["-O2"]
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "ops": None, "error": None}


def _build_and_load() -> None:
    src = CSRC_DIR / _SOURCE
    h = hashlib.sha256(src.read_bytes())
    h.update(f"torch={torch.__version__};{_CFLAGS}".encode())
    tag = h.hexdigest()[:16]
    name = f"loco_aio_{tag}"

    def compile(tmp: Path) -> None:
        from torch.utils.cpp_extension import load

        with contextlib.redirect_stdout(io.StringIO()):
            load(name=name, sources=[str(src)], extra_cflags=_CFLAGS, build_directory=str(tmp),
                 is_python_module=False, with_cuda=False, verbose=False)  # fmt: skip

    load_cached(f"aio-{tag}", name, compile)


def _load() -> None:
    if env_flag(DISABLE_EXT_ENV):
        _state["error"] = f"{DISABLE_EXT_ENV}=1"
        return
    try:
        _build_and_load()
        _state["ops"] = torch.ops.loco_aio
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use the python path"
        _state["error"] = f"{type(e).__name__}: {e}"
        if env_flag(REQUIRE_EXT_ENV):
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
