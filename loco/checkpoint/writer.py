"""Asynchronous checkpoint writes: snapshot to host memory, write in the background, commit.

Every rank of a site calls :meth:`CheckpointWriter.save` at the same step. On the calling
(training) thread it waits for its own previous write, then its tensors are copied into one
reusable staging buffer laid out exactly like its rank file (pinned host memory when a tensor
is on a GPU). By default the copy happens before ``save`` returns: training stalls only for
that copy. With ``overlap=True`` the copy runs beside the next forward and backward (a
background thread on the CPU, a side stream on the GPU) and the caller must call
:meth:`CheckpointWriter.fence` before it next changes the tensors (the optimizer step): the
stall is then only what of the copy is left by then. A background thread writes the
buffer to ``.tmp-step_N/rank_R.bin`` in large chunks straight from its memory (no pickling),
computes the entries' CRC-32s beside it, fsyncs, and writes a small part manifest
``rank_R.json``. Rank 0's thread then waits for every rank's part, writes ``manifest.json``
with its own CRC-32 (fsynced, via a renamed temporary file), fsyncs the directory, renames it
to ``step_N``, atomically replaces ``latest``, and removes checkpoints beyond the last ``keep``
and any leftover temporary directories. A crash at any point leaves the previous checkpoint committed
and ``latest`` naming it. The ranks share the checkpoint directory (one file system per site).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from loco.checkpoint.format import (
    FORMAT,
    LATEST,
    MANIFEST,
    MANIFEST_CRC,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    Entry,
    manifest_crc32,
    part_file,
    plan,
    rank_file,
    step_name,
    steps,
)
from loco.fsutil import atomic_write
from loco.site_comm import SiteComm

log = logging.getLogger(__name__)

CHUNK = 16 << 20
"""Bytes per ``write`` call."""
SLOW_ENV = "LOCO_CKPT_SLOW_WRITE_S"
"""Test hook: sleep this many seconds after every written chunk (kill-during-write drills)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_buffer(path: Path, buf: memoryview, entries: list[Entry], slow_s: float = 0.0) -> None:
    """Write ``buf`` to ``path`` in :data:`CHUNK` pieces and fsync it, filling each entry's
    ``crc32`` on a second thread meanwhile (both release the GIL)."""

    def checksums() -> None:
        for e in entries:
            e.crc32 = zlib.crc32(buf[e.offset : e.offset + e.nbytes])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-crc") as pool:
        crc = pool.submit(checksums)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            while pos < len(buf):
                pos += os.write(fd, buf[pos : pos + CHUNK])
                if slow_s:
                    time.sleep(slow_s)
            os.fsync(fd)
        finally:
            os.close(fd)
        crc.result()


class CheckpointWriter:
    """Writes this rank's part of the site's checkpoints under ``directory``.

    Args:
        directory: the site's checkpoint directory (shared by its ranks).
        comm: the site's ranks (``SiteComm``; one barrier per save); None: one rank.
        keep: committed checkpoints kept (older ones are removed after a commit).
        meta: fields copied into every manifest (run id, site, config, layout, ...).
        commit_timeout_s: rank 0 waits at most this long for the other ranks' parts.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        comm: SiteComm | None = None,
        keep: int = 2,
        meta: dict[str, Any] | None = None,
        commit_timeout_s: float = 600.0,
    ) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.dir = Path(directory)
        self.comm = comm if comm is not None else SiteComm.single()
        self.rank, self.world, self.keep = self.comm.rank, self.comm.world, keep
        self.meta = dict(meta or {})
        self.commit_timeout_s = commit_timeout_s
        self._staging: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None
        self._snapped = threading.Event()
        self._cuda_done: Any = None
        self._stream: Any = None
        self.stall_seconds = 0.0  # of the last save: the time the caller was blocked in it
        self.fence_seconds = 0.0  # of the last fence: the time the caller waited for the copy
        self.write_seconds = 0.0  # of the last finished write (this rank's file, fsynced)

    # ------------------------------------------------------------------ caller's thread

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        *,
        range: tuple[int, int],
        scalars: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
        overlap: bool = False,
    ) -> None:
        """Snapshot ``tensors`` (this rank's entries) and write them in the background.

        ``range`` is the global flat range ``[lo, hi)`` of this rank's range streams;
        ``scalars`` (JSON) go into this rank's file record; ``manifest`` fields (rank 0's are
        used) into the manifest. ``overlap``: copy in the background too; the caller must
        call :meth:`fence` before changing any of ``tensors``. Collective: every rank calls
        it at the same step.
        """
        t0 = time.perf_counter()
        self.wait()
        self.fence_seconds = 0.0
        tmp = self.dir / f"{TMP_PREFIX}{step_name(step)}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.comm.barrier()
        entries, total = plan(tensors)
        staging = self._staging_for(tensors, total)
        self._snapped.clear()
        self._cuda_done = None
        if not overlap:
            self._copy(tensors, entries, staging)
            tensors = {}
        elif staging.is_pinned():  # GPU: copy on a side stream after the work queued so far
            self._cuda_done = self._copy_on_side_stream(tensors, entries, staging)
            tensors = {}
        record = {
            "rank": self.rank,
            "path": rank_file(self.rank),
            "range": list(range),
            "bytes": total,
            "scalars": scalars or {},
        }
        extra = {**self.meta, **(manifest or {})}
        self._error = None
        self._thread = threading.Thread(
            target=self._run,
            args=(step, tmp, staging, total, entries, record, extra, tensors),
            name=f"ckpt-write-{step}",
        )
        self._thread.start()
        self.stall_seconds = time.perf_counter() - t0

    def fence(self) -> None:
        """Return once the last save's snapshot is complete: the saved tensors may change."""
        if self._cuda_done is not None:
            torch.cuda.current_stream().wait_event(self._cuda_done)  # GPU-side wait only
            return
        if self._thread is not None:
            t0 = time.perf_counter()
            self._snapped.wait()
            self.fence_seconds = time.perf_counter() - t0

    def wait(self) -> None:
        """Block until this rank's previous save is written (and, on rank 0, committed);
        re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint write failed: {err}") from err

    def _staging_for(self, tensors: dict[str, torch.Tensor], total: int) -> torch.Tensor:
        on_gpu = any(t.device.type == "cuda" for t in tensors.values())
        s = self._staging
        if s is None or s.numel() < total or (on_gpu and not s.is_pinned()):
            s = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=on_gpu)
            self._staging = s
        return s

    @staticmethod
    @torch.no_grad()
    def _copy(tensors: dict[str, torch.Tensor], entries: list[Entry], s: torch.Tensor) -> None:
        on_gpu = s.is_pinned()
        for e, t in zip(entries, tensors.values(), strict=True):
            dst = s[e.offset : e.offset + e.nbytes].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=on_gpu)
        if on_gpu:
            torch.cuda.current_stream().synchronize()

    @torch.no_grad()
    def _copy_on_side_stream(self, tensors, entries, s):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for e, t in zip(entries, tensors.values(), strict=True):
                dst = s[e.offset : e.offset + e.nbytes].view(t.dtype).view(t.shape)
                dst.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    # ------------------------------------------------------------------ background thread

    def _run(self, step, tmp, staging, total, entries, record, extra, tensors) -> None:
        try:
            if tensors:  # overlap on the CPU: the snapshot is this thread's first job
                self._copy(tensors, entries, staging)
            if self._cuda_done is not None:
                self._cuda_done.synchronize()
            self._snapped.set()
            t0 = time.perf_counter()
            buf = memoryview(staging.numpy()).cast("B")[:total]
            slow = float(os.environ.get(SLOW_ENV, "0") or 0)
            write_buffer(tmp / record["path"], buf, entries, slow)
            self.write_seconds = time.perf_counter() - t0
            record["entries"] = [e.to_json() for e in entries]
            atomic_write(tmp / part_file(self.rank), json.dumps(record).encode())
            if self.rank == 0:
                self._commit(step, tmp, extra)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread)
            log.exception("checkpoint: writing step %d failed", step)
            self._error = e
        finally:
            self._snapped.set()

    def _commit(self, step: int, tmp: Path, extra: dict[str, Any]) -> None:
        parts = [tmp / part_file(r) for r in range(self.world)]
        deadline = time.monotonic() + self.commit_timeout_s
        while not all(p.exists() for p in parts):
            if time.monotonic() > deadline:
                missing = [p.name for p in parts if not p.exists()]
                raise TimeoutError(f"{tmp}: no part from {missing} after {self.commit_timeout_s} s")
            time.sleep(0.01)
        files = [json.loads(p.read_text()) for p in parts]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **extra,
            "step": step,
            "world": self.world,
            "time": time.time(),
            "files": files,
        }
        manifest = json.loads(json.dumps(manifest))  # what a reader parses: string keys, lists
        manifest[MANIFEST_CRC] = manifest_crc32(manifest)
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        for p in parts:
            p.unlink()
        _fsync_dir(tmp)
        final = self.dir / step_name(step)
        if final.exists():  # the same step saved again (a resumed run): replace it
            trash = self.dir / f"{TMP_PREFIX}old-{step_name(step)}"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
        tmp.rename(final)
        _fsync_dir(self.dir)
        atomic_write(self.dir / LATEST, f"{final.name}\n".encode())
        self.last_committed = final
        others = [s for s in steps(self.dir) if s != step]  # the new one is always kept
        for old in others[: max(0, len(others) - (self.keep - 1))]:
            shutil.rmtree(self.dir / step_name(old), ignore_errors=True)
        for p in self.dir.glob(f"{TMP_PREFIX}*"):  # crashed writes; no rank writes one now
            shutil.rmtree(p, ignore_errors=True)
