"""In-memory, bounded mailbox of one rank: payloads of the last rounds and the latest state.

``publish(round, stream, segments)`` stores the payload segments of a round; publishing round
t evicts rounds older than ``t - keep_rounds + 1``. ``wait(round, stream, timeout)`` is the
long poll used by the server: it blocks until that (round, stream) is published, the timeout
passes, or the round is evicted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .framing import DEFAULT_CHUNK_BYTES, ITEMSIZE, MAX_CHUNK_BYTES, crc32_combine, grid_crcs


@dataclass(frozen=True)
class Segment:
    """A contiguous flat range ``[lo, hi)`` of one payload and its bytes.

    ``codec == "raw"`` means ``data`` is ``hi - lo`` elements of ``dtype`` (so the server may
    slice it to any sub-range); any other codec is opaque and always sent whole. ``grid`` holds
    the CRC-32 of each ``grid_bytes`` block (computed once at publish; stream chunks follow this
    grid so the server never re-reads the payload to checksum it), ``crc32`` that of all bytes.
    """

    lo: int
    hi: int
    data: memoryview
    codec: str = "raw"
    dtype: str = "float32"
    crc32: int = field(default=0, compare=False)
    grid_bytes: int = DEFAULT_CHUNK_BYTES
    grid: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @staticmethod
    def make(
        lo: int,
        hi: int,
        data,
        codec: str = "raw",
        dtype: str = "float32",
        grid_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Segment:
        """Validate and wrap ``data`` (any bytes-like object; not copied); checksum it."""
        mv = memoryview(data).cast("B")
        if not 0 <= lo <= hi:
            raise ValueError(f"bad segment range [{lo}, {hi})")
        if codec == "raw":
            if dtype not in ITEMSIZE:
                raise ValueError(f"unknown dtype {dtype!r}; allowed: {sorted(ITEMSIZE)}")
            if len(mv) != (hi - lo) * ITEMSIZE[dtype]:
                raise ValueError(
                    f"raw segment [{lo}, {hi}) of {dtype} needs {(hi - lo) * ITEMSIZE[dtype]} "
                    f"bytes, got {len(mv)}"
                )
        if not 0 < grid_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"grid_bytes must be in (0, {MAX_CHUNK_BYTES}]")
        grid = grid_crcs(mv, grid_bytes)
        crc = 0
        for i, c in enumerate(grid):
            crc = crc32_combine(crc, c, min(grid_bytes, len(mv) - i * grid_bytes))
        return Segment(lo, hi, mv, codec, dtype, crc, grid_bytes, tuple(grid))

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


class RoundEvictedError(LookupError):
    """The round was evicted from the mailbox (server side; becomes NOT_FOUND)."""


class Mailbox:
    """Thread-safe store of ``{round: {stream: [Segment]}}`` plus ``{name: (version, [Segment])}``."""

    def __init__(self, keep_rounds: int = 2) -> None:
        if keep_rounds < 1:
            raise ValueError("keep_rounds must be >= 1")
        self.keep_rounds = keep_rounds
        self._rounds: dict[int, dict[str, list[Segment]]] = {}
        self._state: dict[str, tuple[int, list[Segment]]] = {}
        self._latest = -1
        self._closed = False
        self._cond = threading.Condition()

    @property
    def latest_round(self) -> int:
        """Highest round published so far, -1 if none."""
        return self._latest

    def publish(self, round: int, stream: str, segments: list[Segment]) -> None:
        """Store the segments (sorted, non-overlapping) of ``stream`` for ``round``."""
        segs = sorted(segments, key=lambda s: s.lo)
        for a, b in zip(segs, segs[1:], strict=False):
            if a.hi > b.lo:
                raise ValueError(f"overlapping segments [{a.lo},{a.hi}) and [{b.lo},{b.hi})")
        with self._cond:
            if round < self._latest - self.keep_rounds + 1:
                raise ValueError(f"round {round} is older than the kept window")
            self._rounds.setdefault(round, {})[stream] = segs
            self._latest = max(self._latest, round)
            floor = self._latest - self.keep_rounds + 1
            for r in [r for r in self._rounds if r < floor]:
                del self._rounds[r]
            self._cond.notify_all()

    def publish_state(self, name: str, version: int, segments: list[Segment]) -> None:
        """Replace the state stream ``name`` (served by FetchState) with a new version."""
        with self._cond:
            self._state[name] = (version, sorted(segments, key=lambda s: s.lo))
            self._cond.notify_all()

    def state(self, name: str) -> tuple[int, list[Segment]] | None:
        with self._cond:
            return self._state.get(name)

    def wait(
        self, round: int, stream: str, timeout: float, alive=lambda: True
    ) -> list[Segment] | None:
        """Segments of (round, stream), waiting up to ``timeout`` s; None on timeout/close.

        Raises :class:`RoundEvictedError` if the round is older than the kept window.
        ``alive()`` is polled every 0.25 s so a cancelled caller stops waiting.
        """
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if round < self._latest - self.keep_rounds + 1:
                    kept = sorted(self._rounds)
                    raise RoundEvictedError(f"round {round} evicted; mailbox keeps {kept}")
                segs = self._rounds.get(round, {}).get(stream)
                if segs is not None:
                    return segs
                left = end - time.monotonic()
                if left <= 0 or self._closed or not alive():
                    return None
                self._cond.wait(min(left, 0.25))

    def close(self) -> None:
        """Wake every waiter; later waits return None immediately."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
