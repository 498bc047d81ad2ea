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
PART_ALIGN = ALIGN // 2
"""Values per part are a multiple of this, so parts start on aligned file offsets in fp32 and
16-bit streams alike."""


class NvmeTier:
    """Streams of a range of ``numel`` values in files, moved in parts (module docstring).

    Args:
        directory: where the scratch folder goes (a local NVMe file system for direct I/O).
        numel: values per stream.
        names: the streams (``master`` first, then the optimizer's moments), fp32; or a dict of
            name to dtype (stage 3's ``param`` stream holds the compute dtype).
        part_numel: values per part (rounded up to :data:`PART_ALIGN`, at most ``numel``).
        backend: the :class:`AioQueue` backend (``auto``: Linux AIO when there is one).
        tag: names the scratch folder (the rank).
    """

    def __init__(self, *, directory: str, numel: int,
                 names: tuple[str, ...] | dict[str, torch.dtype], part_numel: int,
                 backend: str = "auto", tag: str = "r0") -> None:  # fmt: skip
        if numel < 0 or part_numel < 1:
            raise ValueError(f"tier numel {numel} must be >= 0 and part_numel {part_numel} >= 1")
        os.makedirs(directory, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f"loco-tier-{tag}-{os.getpid()}-", dir=directory)
        # removed at exit, in spawned ranks too (multiprocessing runs these, not atexit's)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(self.root, True), exitpriority=10)
        dtypes = names if isinstance(names, dict) else dict.fromkeys(names, torch.float32)
        self.numel, self.names, self.dtypes = numel, tuple(dtypes), dtypes
        self.itemsize = {n: torch.empty((), dtype=d).element_size() for n, d in dtypes.items()}
        self.part_numel = min(round_up(part_numel, PART_ALIGN), round_up(max(numel, 1), PART_ALIGN))
        step = self.part_numel
        self.parts = [(a, min(a + step, numel)) for a in range(0, numel, step)]
        self.queue = AioQueue(backend=backend)
        self.fds: dict[str, int] = {}
        self.direct = True
        for n in self.names:
            fd, direct = open_direct(os.path.join(self.root, f"{n}.bin"), create=True)
            os.ftruncate(fd, round_up(numel * self.itemsize[n]))
            self.fds[n] = fd
            self.direct = self.direct and direct
        n_slots = SLOTS if self.parts else 0
        self.slots = [
            {n: aligned_empty(self.part_numel, d) for n, d in dtypes.items()}
            for _ in range(n_slots)
        ]
        self.bytes_read = self.bytes_written = 0

    @property
    def file_bytes(self) -> int:
        """Bytes the tier's files take on disk."""
        return sum(round_up(self.numel * i) for i in self.itemsize.values())

    @property
    def buffer_bytes(self) -> int:
        """Bytes of host memory the part buffers take."""
        return SLOTS * sum(round_up(self.part_numel * i) for i in self.itemsize.values())

    def _io(self, k: int, slot: int, names: tuple[str, ...], write: bool) -> list[int]:
        a, b = self.parts[k]
        reqs = []
        for n in names:
            isz = self.itemsize[n]
            nbytes = round_up((b - a) * isz)
            buf = byte_view(self.slots[slot][n], nbytes)
            reqs.append(self.queue.submit(self.fds[n], buf, a * isz, write=write))
            if write:
                self.bytes_written += nbytes
            else:
                self.bytes_read += nbytes
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

    def load(self, name: str) -> torch.Tensor:
        """The whole stream ``name`` (a new aligned host tensor of ``numel`` values)."""
        return self.finish_range(self.start_range(name, 0, self.numel))

    def start_range(self, name: str, a: int, b: int) -> tuple:
        """Start reading values ``[a, b)`` of ``name``: the aligned blocks around them, into a
        fresh aligned buffer; :meth:`finish_range` waits and returns the values."""
        if not 0 <= a <= b <= self.numel:
            raise ValueError(f"range [{a}, {b}) is outside the tier's {self.numel} values")
        isz = self.itemsize[name]
        lo, hi = a * isz // ALIGN * ALIGN, round_up(b * isz)
        buf = aligned_empty((hi - lo) // isz, self.dtypes[name])
        req = None
        if hi > lo:
            req = self.queue.submit(self.fds[name], byte_view(buf, hi - lo), lo, write=False)
            self.bytes_read += hi - lo
        return req, buf, (a * isz - lo) // isz, b - a

    def finish_range(self, started: tuple) -> torch.Tensor:
        req, buf, off, n = started
        if req is not None:
            self.queue.wait(req)
        return buf[off : off + n]

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
            self.slots[slot][name][: b - a].copy_(values[a:b])
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


class ParamFile:
    """Stage 3's compute parameters of this rank's shard, in the tier's ``param`` stream.

    Stands in for the shard tensor ``BlockShards`` reads its own pieces from
    (``source[a:b]``, shard-relative). ``units``: each unit's own pieces, in unit order. Reading
    a unit's piece starts reading the next unit's in the direction of travel (forward: up,
    backward: down), so the disk works while the current block computes.
    """

    def __init__(self, tier: NvmeTier, units: list[list[tuple[int, int]]]) -> None:
        self.tier, self.units = tier, units
        self.unit_of = {piece: u for u, pieces in enumerate(units) for piece in pieces}
        self._inflight: dict[int, dict[tuple[int, int], tuple]] = {}
        self._last, self._dir = -1, 1
        self.prefetched = self.waited = 0

    def __getitem__(self, sl: slice) -> torch.Tensor:
        a, b = sl.start, sl.stop
        u = self.unit_of.get((a, b))
        if u is None:
            return self.tier.finish_range(self.tier.start_range("param", a, b))
        if u != self._last:
            self._dir = 1 if u > self._last else -1
        elif u in (0, len(self.units) - 1):
            self._dir = 1 if u == 0 else -1  # turning at an end: forward done, backward next
        self._last = u
        reads = self._inflight.setdefault(u, {})
        if (a, b) in reads:
            self.prefetched += 1
        else:
            reads[(a, b)] = self.tier.start_range("param", a, b)
        out = self.tier.finish_range(reads.pop((a, b)))
        if not reads:
            del self._inflight[u]
        self.waited += 1
        nxt = u + self._dir
        while 0 <= nxt < len(self.units) and not self.units[nxt]:  # units this rank owns none of
            nxt += self._dir
        if nxt >= len(self.units):
            nxt = u  # the turn: backward starts by gathering this block again
        if 0 < nxt < len(self.units):  # the root (0) is gathered in forward only, first
            self._start(nxt)
        return out

    def _start(self, u: int) -> None:
        if u not in self._inflight:
            self._inflight[u] = {p: self.tier.start_range("param", *p) for p in self.units[u]}

    def reset(self) -> None:
        """Drop reads in flight (the values are about to change: a step, a commit)."""
        for reads in self._inflight.values():
            for r in reads.values():
                self.tier.finish_range(r)
        self._inflight.clear()
