"""Loader of the compiled ``torch.ops.loco`` kernels (``csrc/``), with a pure-torch fallback.

Build policy (see docs/wire-format.md, "Kernels and build"):

* The kernels are compiled on first use with ``torch.utils.cpp_extension.load`` from the
  repository's ``csrc/`` into ``$LOCO_EXT_DIR`` or ``~/.cache/loco/ext/<hash>``, where the hash
  covers the sources, the torch version, the build flags and whether CUDA is built. A file lock
  keeps parallel processes (ranks) from compiling at the same time; a cached library loads in
  well under a second.
* The CUDA kernels (``csrc/*.cu``) are built only when torch has CUDA and ``nvcc`` exists.
* If the build fails, the pure-torch reference runs instead and ONE warning is issued per process.
  ``LOCO_REQUIRE_EXT=1`` turns a failed build into an error (CI); ``LOCO_DISABLE_EXT=1`` forces
  the reference path without a warning.
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

from loco.ext_cache import DISABLE_EXT_ENV, EXT_DIR_ENV, REQUIRE_EXT_ENV, env_flag, load_cached

__all__ = ["ext_available", "ext_ops", "ext_has_cuda", "ext_error", "CSRC_DIR", "EXT_DIR_ENV"]


CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = ("compress.cpp",)
_CUDA_SOURCES = ("compress_cuda.cu",)
_HEADERS = ("compress.h", "compress_kernels.inc")
# -fno-trapping-math only lets the vectorizer if-convert; results are bit-identical.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
_LDFLAGS = ["-fopenmp"]
_NVCC_FLAGS = ["-O3", "--fmad=false"]

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "ops": None, "cuda": False, "error": None}


def _want_cuda() -> bool:
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def _source_tag(sources: list[Path], cuda: bool) -> str:
    h = hashlib.sha256()
    for p in sorted(sources + [CSRC_DIR / name for name in _HEADERS]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"torch={torch.__version__};cuda={cuda};{_CFLAGS};{_NVCC_FLAGS}".encode())
    return h.hexdigest()[:16]


def _build_and_load(cuda: bool) -> None:
    """Load the cached library for these sources, compiling it first if needed."""
    sources = [CSRC_DIR / s for s in _CPU_SOURCES]
    if cuda:
        sources += [CSRC_DIR / s for s in _CUDA_SOURCES]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {missing}")
    tag = _source_tag(sources, cuda)
    name = f"loco_ext_{tag}"
    load_cached(tag, name, lambda tmp: _compile(name, sources, tmp, cuda))


def _load() -> None:
    """Build (if needed) and load the library; record the failure instead of raising."""
    if env_flag(DISABLE_EXT_ENV):
        _state["error"] = f"{DISABLE_EXT_ENV}=1"
        return
    try:
        cuda = _want_cuda()
        try:
            _build_and_load(cuda)
        except Exception as e:
            if not cuda or env_flag(REQUIRE_EXT_ENV):
                raise
            # Keep the CPU kernels when only the CUDA part fails to build.
            warnings.warn(
                f"loco: building the CUDA kernels failed ({type(e).__name__}: {str(e)[:300]}); "
                "using the CPU kernels, and the pure-torch reference on the GPU.",
                RuntimeWarning,
                stacklevel=3,
            )
            cuda = False
            _build_and_load(cuda)
        _state["ops"] = torch.ops.loco
        _state["cuda"] = cuda
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use the reference"
        _state["error"] = f"{type(e).__name__}: {e}"
        if env_flag(REQUIRE_EXT_ENV):
            raise RuntimeError(
                f"loco: compiling the csrc/ kernels failed and {REQUIRE_EXT_ENV}=1 is set: "
                f"{_state['error']}"
            ) from e
        warnings.warn(
            "loco: the compiled compression kernels are unavailable, using the slower "
            f"pure-torch reference ({_state['error'][:500]}). Install a C++ compiler and ninja, "
            f"or set {DISABLE_EXT_ENV}=1 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


def _compile(name: str, sources: list[Path], build_dir: Path, cuda: bool) -> None:
    from torch.utils.cpp_extension import load

    tmp = build_dir / f"{name}.so"
    with contextlib.redirect_stdout(io.StringIO()):
        load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            extra_cuda_cflags=_NVCC_FLAGS if cuda else None,
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(build_dir),
            is_python_module=False,
            with_cuda=cuda,
            verbose=False,
        )
    if not tmp.exists():
        raise FileNotFoundError(f"build produced no {tmp.name}")


def _ensure() -> None:
    if _state["loaded"]:
        return
    with _lock:
        if not _state["loaded"]:
            try:
                _load()
            finally:
                _state["loaded"] = True


def ext_ops() -> Any | None:
    """``torch.ops.loco`` once the compiled kernels are loaded, else None (reference path).

    Raises:
        RuntimeError: the build failed and ``LOCO_REQUIRE_EXT=1`` is set.
    """
    _ensure()
    if _state["ops"] is None and env_flag(REQUIRE_EXT_ENV) and not env_flag(DISABLE_EXT_ENV):
        raise RuntimeError(
            f"loco: the csrc/ kernels are unavailable and {REQUIRE_EXT_ENV}=1 is set: "
            f"{_state['error']}"
        )
    return _state["ops"]


def ext_available() -> bool:
    """True when the compiled kernels are loaded (building them on first call)."""
    return ext_ops() is not None


def ext_has_cuda() -> bool:
    """True when the loaded library includes the CUDA kernels."""
    _ensure()
    return bool(_state["cuda"]) and _state["ops"] is not None


def ext_error() -> str | None:
    """Why the compiled kernels are not in use, or None when they are."""
    _ensure()
    return _state["error"]
