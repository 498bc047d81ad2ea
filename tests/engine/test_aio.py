"""The asynchronous I/O op (csrc/aio.cpp) against the pure-python reference: the same bytes on
every backend, with and without O_DIRECT, errors reported, buffers aligned."""

from __future__ import annotations

import errno
import os
import warnings

import pytest
import torch

from loco.engine import aio
from loco.engine._aio_ext import aio_ops

BACKENDS = ["python"] + (["aio", "threads"] if aio_ops() is not None else [])


def test_aligned_empty_is_aligned_and_rounded() -> None:
    for n in (1, 1023, 1024, 5000):
        t = aio.aligned_empty(n)
        assert t.data_ptr() % aio.ALIGN == 0 and t.numel() == n
        assert aio.byte_view(t, aio.round_up(n * 4)).numel() == aio.round_up(n * 4)
    with pytest.raises(ValueError):
        aio.byte_view(aio.aligned_empty(10), 2 * aio.ALIGN)


@pytest.mark.parametrize("writer", BACKENDS)
def test_backends_move_the_same_bytes(tmp_path, writer: str) -> None:
    """Write pieces at aligned offsets with one backend, read them back with every backend
    (and with plain os.pread): the bytes are those written, whatever the chunking."""
    path = str(tmp_path / "f.bin")
    fd, _ = aio.open_direct(path, create=True)
    g = torch.Generator().manual_seed(0)
    n = 3 * (1 << 18) + 1024  # 3 MiB + 4 KiB: several chunks and a partial last one
    src = aio.aligned_empty(n)
    src.copy_(torch.randn(n, generator=g))
    q = aio.AioQueue(backend=writer, chunk=1 << 20, depth=4)
    assert q.backend == writer
    half = (n // 2) // 1024 * 1024
    reqs = [q.submit(fd, src[:half], 0, write=True), q.submit(fd, src[half:], half * 4, write=True)]
    assert sum(q.wait(r) for r in reversed(reqs)) == n * 4  # waited out of order
    q.close()
    for reader in BACKENDS:
        dst = aio.aligned_empty(n)
        dst.zero_()
        rq = aio.AioQueue(backend=reader, chunk=1 << 16)
        assert rq.wait(rq.submit(fd, dst, 0, write=False)) == n * 4
        rq.close()
        assert torch.equal(dst, src), reader
    with open(path, "rb") as f:  # the reference: the file holds exactly these bytes
        assert f.read() == src.numpy().tobytes()
    os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_read_and_bad_buffer_are_errors(tmp_path, backend: str) -> None:
    fd, _ = aio.open_direct(str(tmp_path / "short.bin"), create=True)
    os.ftruncate(fd, aio.ALIGN)  # one block: reading two is a short transfer
    q = aio.AioQueue(backend=backend)
    buf = aio.aligned_empty(2 * aio.ALIGN // 4)
    with pytest.raises((OSError, RuntimeError), match="short transfer"):
        q.wait(q.submit(fd, buf, 0, write=False))
    with pytest.raises(ValueError, match="contiguous CPU"):
        q.submit(fd, buf.view(2, -1).t(), 0, write=False)
    q.close()
    os.close(fd)
    with pytest.raises(ValueError, match="backend"):
        aio.AioQueue(backend="uring")


def test_open_direct_falls_back_with_one_warning(tmp_path, monkeypatch) -> None:
    """A file system without O_DIRECT answers EINVAL to the flag (tmpfs before Linux 6.6 does;
    newer kernels give tmpfs O_DIRECT, so the answer is made here): the file opens buffered,
    one warning in all, and the queue moves the same bytes."""
    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(aio.os, "open", no_direct)
    aio._warned.discard("direct")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fds = [aio.open_direct(str(tmp_path / f"{i}.bin"), create=True) for i in range(2)]
    assert [direct for _, direct in fds] == [False, False]
    assert len([x for x in w if "O_DIRECT" in str(x.message)]) == 1
    q = aio.AioQueue()
    src = aio.aligned_empty(1000)  # not a whole block: fine without O_DIRECT
    src.copy_(torch.arange(1000.0))
    q.wait(q.submit(fds[0][0], src, 0, write=True))
    dst = aio.aligned_empty(1000)
    q.wait(q.submit(fds[0][0], dst, 0, write=False))
    assert torch.equal(dst, src)
    q.close()
    for fd, _ in fds:
        os.close(fd)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # any other error is raised, not papered over
        aio.open_direct(str(tmp_path / "no" / "such"), create=False)
