"""Asynchronous reads and writes of CPU buffers at file offsets, for the NVMe tier.

:class:`AioQueue` submits a request (one contiguous CPU buffer to or from one file offset, in
``chunk``-byte pieces that are in flight together) and returns an id to wait on. Backends:

- ``aio``: Linux AIO through the compiled op (``csrc/aio.cpp``); with ``O_DIRECT`` the transfer
  runs in the kernel while the caller computes;
- ``threads``: the compiled op's pool of pread/pwrite threads (no AIO, or not O_DIRECT);
- ``python``: the pure-python reference, ``os.preadv``/``os.pwritev`` on a thread pool (the
  compiled op is unavailable); the same bytes as the others.

``O_DIRECT`` wants the buffer address, the file offset and the length aligned to the device's
block: :func:`aligned_empty` gives :data:`ALIGN`-aligned buffers and callers keep offsets and
lengths multiples of it. :func:`open_direct` falls back to buffered I/O (one warning) on a file
system without ``O_DIRECT`` (tmpfs).
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loco.engine._aio_ext import aio_ops

ALIGN = 4096
"""Alignment of buffers, offsets and lengths for ``O_DIRECT`` (bytes)."""
BACKENDS = ("auto", "aio", "threads", "python")
_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """One warning per process per ``key``."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_empty(
    numel: int, dtype: torch.dtype = torch.float32, *, pin: bool = False
) -> torch.Tensor:
    """An uninitialized CPU tensor whose data starts on an :data:`ALIGN` boundary and whose
    byte length is rounded up to a multiple of it (the returned tensor has ``numel`` values;
    its storage extends to the rounded length). ``pin``: page-locked (for GPU copies)."""
    item = torch.empty((), dtype=dtype).element_size()
    nbytes = round_up(numel * item)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + nbytes].view(dtype)[:numel]


def byte_view(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` bytes under ``t`` (an :func:`aligned_empty` tensor: may reach past
    its last value, up to the rounded length)."""
    base = t.untyped_storage()
    start = t.storage_offset() * t.element_size()
    room = min(round_up(t.numel() * t.element_size()), base.nbytes() - start)
    if nbytes > room:  # the rounded length, whatever slack the allocation happens to have
        raise ValueError(f"{nbytes} bytes reach past the buffer's {room}")
    return torch.empty(0, dtype=torch.uint8).set_(base, start, (nbytes,))


def open_direct(path: str, *, create: bool) -> tuple[int, bool]:
    """Open ``path`` for reading and writing with ``O_DIRECT`` when the file system has it.

    Returns ``(fd, direct)``. Without ``O_DIRECT`` (EINVAL: tmpfs and the like) the file opens
    buffered, with one warning: the page cache then holds what the tier writes."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    warn_once(
        "direct",
        f"loco: the NVMe tier's directory has no O_DIRECT ({os.path.dirname(path)}): using "
        "buffered I/O, so the page cache keeps copies of the tier's files; put zero.nvme_dir on "
        "a local disk file system (ext4, xfs) for direct I/O",
    )
    return os.open(path, flags, 0o600), False


def _python_transfer(fd: int, buf: torch.Tensor, offset: int, write: bool) -> int:
    mv = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(mv):
        piece = mv[done:]
        n = (
            os.pwritev(fd, [piece], offset + done)
            if write
            else os.preadv(fd, [piece], offset + done)
        )
        if n == 0:
            break
        done += n
    if done != len(mv):
        raise OSError(errno.EIO, f"short transfer: {done} of {len(mv)} bytes (file too short?)")
    return done


class AioQueue:
    """Asynchronous transfers on one queue (module docstring).

    Args:
        backend: ``auto`` (``aio`` when the compiled op loads and the kernel has AIO, else
            ``threads``, else ``python``), or one of ``aio``, ``threads``, ``python``.
        depth: chunks in flight at once (threads: up to 16 workers).
        chunk: bytes per chunk (a multiple of :data:`ALIGN`).
    """

    def __init__(self, *, backend: str = "auto", depth: int = 32, chunk: int = 1 << 20) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"aio backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if not 1 <= depth <= 4096 or chunk < ALIGN or chunk % ALIGN:
            raise ValueError(
                f"depth {depth} must be in [1, 4096], chunk {chunk} a multiple of {ALIGN}"
            )
        self.chunk, self.depth = chunk, depth
        self._ops = aio_ops() if backend != "python" else None
        self._handle = 0
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, list[Future[int]]] = {}
        self._next = 1
        if self._ops is not None and backend in ("auto", "aio"):
            h = int(self._ops.open_queue(0, depth))
            if h > 0:
                self._handle, self.backend = h, "aio"
            elif backend == "aio":
                raise OSError(-h, f"Linux AIO is unavailable here: {os.strerror(-h)}")
        if not self._handle and self._ops is not None and backend in ("auto", "threads"):
            self._handle, self.backend = int(self._ops.open_queue(1, depth)), "threads"
        if not self._handle:
            if backend in ("aio", "threads"):
                raise RuntimeError(f"aio backend {backend!r} needs the compiled op")
            self._pool, self.backend = ThreadPoolExecutor(min(depth, 16), "loco-aio"), "python"

    def submit(self, fd: int, buf: torch.Tensor, offset: int, *, write: bool) -> int:
        """Start moving ``buf`` (contiguous, CPU) to (``write``) or from file offset ``offset``."""
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("aio buffers are contiguous CPU tensors")
        if self._handle:
            return int(self._ops.submit(self._handle, fd, buf, offset, write, self.chunk))
        assert self._pool is not None
        flat = buf.view(-1).view(torch.uint8) if buf.numel() else buf.view(torch.uint8)
        futs = [
            self._pool.submit(_python_transfer, fd, flat[a : a + self.chunk], offset + a, write)
            for a in range(0, flat.numel(), self.chunk)
        ]
        rid, self._next = self._next, self._next + 1
        self._futures[rid] = futs
        return rid

    def wait(self, request: int) -> int:
        """Block until ``request`` is done; the bytes moved. Raises on an I/O error."""
        if self._handle:
            return int(self._ops.wait(self._handle, request))
        return sum(f.result() for f in self._futures.pop(request))

    def close(self) -> None:
        """Wait for everything in flight, then release the queue."""
        if self._handle:
            self._ops.close_queue(self._handle)
            self._handle = 0
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
