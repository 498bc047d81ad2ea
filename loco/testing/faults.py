"""Fault injection for the drills (tests/drills/): one spec for a whole federation.

The spec is JSON in the environment variable ``LOCO_FAULTS`` (or ``@path`` to a JSON file), read
here and nowhere else. ``loco.local`` passes its environment to every site, so one spec describes
the faults of every site; each site takes the entries that name it. Every entry is optional and
acts during the outer rounds ``[a, b)`` of its ``rounds`` (round t ends at inner step t * H)::

    {"partition": {"groups": [["eu"], ["us", "asia"]], "rounds": [2, 5]},
     "slow":      {"site": "asia", "factor": 3.0, "rounds": [2, 5]},
     "payload":   {"site": "us", "kind": "nan" | "garbage" | "huge", "rounds": [2, 5]}}

``payload`` may also be a list of such entries (e.g. NaN in some rounds, garbage in others).

- ``partition``: from the boundary of round a to that of round b, every gossip RPC (Hello,
  heartbeat, pull) to a site of another group fails at once as UNAVAILABLE, on both sides.
  Membership sees the peers die and pairs within each side; they come back after b.
- ``slow``: the inner steps of rounds [a, b) of ``site`` take ``factor`` times as long (it
  sleeps ``factor - 1`` times each step's measured time).
- ``payload``: ``site`` publishes, in rounds [a, b), well-formed frames with valid checksums
  whose values are NaN (``nan``), random bytes (``garbage``) or finite 1e30 (``huge``), instead
  of its delta and phi.
  It still applies its own true values itself.

Not for production: a site started without ``LOCO_FAULTS`` is built of the production classes
only. With it, ``loco.build`` wraps the gossip client with :func:`cut_links` and builds a
:class:`FaultyOuterLoop` instead of the ``OuterLoop``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from loco.outer.loop import OuterLoop

ENV = "LOCO_FAULTS"
KINDS = ("partition", "slow", "payload")


def _window(entry: dict[str, Any], what: str) -> tuple[int, int]:
    r = entry.get("rounds", [0, 1 << 62])
    if not (isinstance(r, list) and len(r) == 2 and 0 <= r[0] <= r[1]):
        raise ValueError(f"{ENV}: {what}.rounds={r!r} must be [a, b) with 0 <= a <= b")
    return int(r[0]), int(r[1])


class Faults:
    """The faults of one site, from a federation spec (see the module docstring).

    :class:`FaultyOuterLoop` calls :meth:`at_round` at every boundary, :meth:`after_step` after
    every inner step and :meth:`corrupt` on what it publishes; the client wrapped by
    :func:`~loco.testing.gossip_faults.cut_links` asks :meth:`blocked` before every RPC.
    """

    def __init__(self, spec: dict[str, Any], *, site: str) -> None:
        unknown = set(spec) - set(KINDS)
        if unknown:
            raise ValueError(
                f"{ENV}: unknown fault(s) {sorted(unknown)}; known: {', '.join(KINDS)}"
            )
        self.site, self.round = site, 0
        self.cut: set[str] = set()  # sites across the partition
        self.cut_rounds = (0, 0)
        if p := spec.get("partition"):
            groups = [set(g) for g in p["groups"]]
            mine = next((g for g in groups if site in g), None)
            if mine is not None:
                self.cut = set().union(*groups) - mine
            self.cut_rounds = _window(p, "partition")
        s = spec.get("slow") or {}
        self.slow_factor = float(s.get("factor", 1.0)) if s.get("site") == site else 1.0
        if self.slow_factor < 1.0:
            raise ValueError(f"{ENV}: slow.factor={self.slow_factor} must be >= 1")
        self.slow_rounds = _window(s, "slow") if s else (0, 0)
        b = spec.get("payload") or []
        self.payloads: list[tuple[str, tuple[int, int]]] = []  # (kind, rounds) of this site
        for e in [b] if isinstance(b, dict) else b:
            if e.get("kind") not in ("nan", "garbage", "huge"):
                raise ValueError(
                    f"{ENV}: payload.kind={e.get('kind')!r} must be nan, garbage or huge"
                )
            if e.get("site") == site:
                self.payloads.append((e["kind"], _window(e, "payload")))
        self._rng = np.random.default_rng(zlib.crc32(site.encode()))
        self._step_end = time.perf_counter()

    @staticmethod
    def _in(t: int, window: tuple[int, int]) -> bool:
        return window[0] <= t < window[1]

    def at_round(self, t: int) -> None:
        """The boundary of round ``t`` is being run (the partition follows it)."""
        self.round = t

    def blocked(self, site: str) -> bool:
        """True while ``site`` is across the partition from this site."""
        return site in self.cut and self._in(self.round, self.cut_rounds)

    def after_step(self, done: int, H: int) -> None:
        """Sleep so that inner step ``done`` took ``slow.factor`` times its measured time."""
        now = time.perf_counter()
        took, self._step_end = now - self._step_end, now
        if self.slow_factor > 1.0 and self._in(-(-done // H), self.slow_rounds):
            time.sleep((self.slow_factor - 1.0) * took)
        self._step_end = time.perf_counter()

    def corrupt(self, t: int, buf: Any) -> Any:
        """What this site publishes for round ``t`` instead of ``buf`` (``buf`` itself if no
        fault): a raw fp32 array or a ``loco.compress`` frame, of the same size."""
        kind = next((k for k, w in self.payloads if self._in(t, w)), "")
        if not kind:
            return buf
        n = memoryview(buf).nbytes
        if kind == "garbage":
            return self._rng.integers(0, 256, n, dtype=np.uint8)
        value = 1e30 if kind == "huge" else np.nan
        if isinstance(buf, np.ndarray) and buf.dtype == np.float32:  # raw stream
            return np.full_like(buf, value)
        return _value_frame(max(1, (n - 40) // 4), value)


class FaultyOuterLoop(OuterLoop):
    """An :class:`~loco.outer.loop.OuterLoop` that applies this site's :class:`Faults`.

    After every inner step ``faults.after_step``; at each boundary ``faults.at_round`` first (a
    partition follows it from that round's live set, pairing and pulls on); on the delta and
    phi published for round t ``faults.corrupt`` (the site still applies its own true values).
    """

    def __init__(self, *, faults: Faults, **kw: Any) -> None:
        super().__init__(**kw)
        self.faults = faults

    def on_step_end(self, done: int) -> None:
        self.faults.after_step(done, self.H)
        super().on_step_end(done)

    def _boundary(self, t: int, done: int, overlap: bool) -> None:
        self.faults.at_round(t)
        super()._boundary(t, done, overlap)

    def _publish(self, t: int, stream: str, buf: Any, label: str) -> None:
        super()._publish(t, stream, self.faults.corrupt(t, buf), label)


def _value_frame(numel: int, value: float = np.nan) -> np.ndarray:
    """A ``loco.compress`` frame (codec none, fp32) of ``numel`` copies of ``value`` with valid
    checksums: what a sender that skipped the encoder's checks would ship (NaN), or finite
    garbage (``huge``: 1e30)."""
    import torch

    from loco.compress import crc32c, encode
    from loco.compress.wire import HEADER_SIZE, Header

    frame = bytearray(memoryview(encode(torch.zeros(numel), "none")).cast("B"))
    payload = np.full(numel, value, dtype=np.float32).tobytes()
    frame[HEADER_SIZE:] = payload
    h = Header.unpack(memoryview(frame), crc32c)
    head = Header(h.codec_id, h.dtype_id, h.flags, h.numel, h.block, h.k, h.payload_len,
                  crc32c(payload)).pack(crc32c)  # fmt: skip
    frame[:HEADER_SIZE] = head
    return np.frombuffer(bytes(frame), dtype=np.uint8)


def load(site: str) -> Faults | None:
    """The faults of ``site`` from ``$LOCO_FAULTS`` (None when it is unset or empty)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    if raw.startswith("@"):
        raw = Path(raw[1:]).read_text()
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise ValueError(
            f"{ENV} is not valid JSON ({e}); see loco/testing/faults.py for the format"
        ) from None
    if not isinstance(spec, dict):
        raise ValueError(f"{ENV} must be a JSON object; see loco/testing/faults.py for the format")
    return Faults(spec, site=site)
