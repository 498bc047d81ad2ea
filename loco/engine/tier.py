"""The NVMe tier (ZeRO-Infinity, arXiv 2104.07857): fp32 state of one flat range in files.

:class:`NvmeTier` keeps named fp32 streams of one range (``master``, the optimizer moments) in
one file each, under a private scratch folder of ``directory`` (``loco-tier-<tag>-<pid>-*``),
and moves them through :data:`SLOTS` sets of aligned part buffers with :class:`AioQueue`
(``O_DIRECT`` where the file system has it, so the page cache holds no copy). The range is cut
into parts of ``part_numel`` values (a multiple of ``ALIGN / 4``, so every part starts on an
aligned file offset); the optimizer step streams them (``loco.engine.offload.TierStep``).

The files are scratch, never a checkpoint: they are created empty at start, removed at
:meth:`NvmeTier.close` (and at interpreter exit), and a crashed run's leftovers are ignored by
the next one (each run makes its own folder). Checkpoints read and write the streams through
:meth:`load` / :meth:`store`, so a checkpoint written from the tier is the same as one written
from memory and reshards the same way.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile

import torch

from loco.engine.aio import ALIGN, AioQueue, aligned_empty, byte_view, open_direct, round_up

SLOTS = 3
"""Part buffers per stream: part k+1 is read while part k is updated and part k-1 written."""
PART_ALIGN = ALIGN // 4
"""Values per part are a multiple of this (fp32 values per aligned block)."""


class NvmeTier:
    """fp32 streams of a range of ``numel`` values in files, moved in parts (module docstring).

    Args:
        directory: where the scratch folder goes (a local NVMe file system for direct I/O).
        numel: values per stream.
        names: the streams (``master`` first, then the optimizer's moments).
        part_numel: values per part (rounded up to :data:`PART_ALIGN`, at most ``numel``).
        backend: the :class:`AioQueue` backend (``auto``: Linux AIO when there is one).
        tag: names the scratch folder (the rank).
    """

    def __init__(self, *, directory: str, numel: int, names: tuple[str, ...], part_numel: int,
                 backend: str = "auto", tag: str = "r0") -> None:  # fmt: skip
        if numel < 0 or part_numel < 1:
            raise ValueError(f"tier numel {numel} must be >= 0 and part_numel {part_numel} >= 1")
        os.makedirs(directory, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f"loco-tier-{tag}-{os.getpid()}-", dir=directory)
        # removed at exit, in spawned ranks too (multiprocessing runs these, not atexit's)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(self.root, True), exitpriority=10)
        self.numel, self.names = numel, names
        self.part_numel = min(round_up(part_numel, PART_ALIGN), round_up(max(numel, 1), PART_ALIGN))
        self.parts = [
            (a, min(a + self.part_numel, numel)) for a in range(0, numel, self.part_numel)
        ]
        self.queue = AioQueue(backend=backend)
        self.fds: dict[str, int] = {}
        self.direct = True
        for n in names:
            fd, direct = open_direct(os.path.join(self.root, f"{n}.bin"), create=True)
            os.ftruncate(fd, round_up(numel * 4))
            self.fds[n] = fd
            self.direct = self.direct and direct
        self.slots = [
            {n: aligned_empty(self.part_numel) for n in names}
            for _ in range(SLOTS if self.parts else 0)
        ]
        self.bytes_read = self.bytes_written = 0

    @property
    def file_bytes(self) -> int:
        """Bytes the tier's files take on disk."""
        return len(self.names) * round_up(self.numel * 4)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of host memory the part buffers take."""
        return SLOTS * len(self.names) * round_up(self.part_numel * 4)

    def _io(self, k: int, slot: int, names: tuple[str, ...], write: bool) -> list[int]:
        a, b = self.parts[k]
        nbytes = round_up((b - a) * 4)
        reqs = [
            self.queue.submit(
                self.fds[n], byte_view(self.slots[slot][n], nbytes), a * 4, write=write
            )
            for n in names
        ]
        if write:
            self.bytes_written += nbytes * len(names)
        else:
            self.bytes_read += nbytes * len(names)
        return reqs

    def read(self, k: int, slot: int, names: tuple[str, ...] | None = None) -> list[int]:
        """Start reading part ``k`` of ``names`` (default all) into slot ``slot``."""
        return self._io(k, slot, self.names if names is None else names, write=False)

    def write(self, k: int, slot: int, names: tuple[str, ...] | None = None) -> list[int]:
        """Start writing slot ``slot`` to part ``k`` of ``names`` (default all)."""
        return self._io(k, slot, self.names if names is None else names, write=True)

    def wait(self, requests: list[int]) -> None:
        for r in requests:
            self.queue.wait(r)

    def buffers(self, k: int, slot: int) -> dict[str, torch.Tensor]:
        """The part-``k`` values of every stream in slot ``slot``."""
        a, b = self.parts[k]
        return {n: t[: b - a] for n, t in self.slots[slot].items()}

    @torch.no_grad()
    def load(self, name: str) -> torch.Tensor:
        """The whole stream ``name`` (a new aligned host tensor of ``numel`` values)."""
        out = aligned_empty(self.numel)
        if self.numel:
            self.queue.wait(self.queue.submit(self.fds[name], byte_view(out, round_up(self.numel * 4)),
                                              0, write=False))  # fmt: skip
            self.bytes_read += round_up(self.numel * 4)
        return out

    @torch.no_grad()
    def store(self, name: str, values: torch.Tensor) -> None:
        """Write ``values`` (``numel`` values, any device or dtype) as stream ``name``, in
        parts through the slot buffers (two in flight)."""
        if values.numel() != self.numel:
            raise ValueError(f"stream {name!r} takes {self.numel} values, got {values.numel()}")
        pending: list[list[int]] = [[] for _ in self.slots]
        for k, (a, b) in enumerate(self.parts):
            slot = k % len(self.slots)
            self.wait(pending[slot])
            buf = self.slots[slot][name]
            buf[: b - a].copy_(values[a:b])
            buf[b - a :].zero_()
            pending[slot] = self.write(k, slot, (name,))
        for reqs in pending:
            self.wait(reqs)

    def close(self) -> None:
        """Finish what is in flight, close and remove the scratch files."""
        self.queue.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        shutil.rmtree(self.root, ignore_errors=True)
