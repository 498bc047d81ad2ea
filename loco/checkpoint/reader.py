"""Reading universal checkpoints: verified entries, any flat range, full vectors, a model.

A *range stream* (``master``, ``optim.*``, ``outer.*``) is one fp32 vector of length P split
over the saving ranks: file ``r`` holds it on ``files[r].range``. :meth:`Checkpoint.read_range`
assembles any ``[lo, hi)`` by intersecting it with those ranges, so a checkpoint saved by N
ranks loads at any M ranks and any ZeRO stage. Every entry read is checked against its CRC-32
first; a mismatch is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from loco.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    Entry,
    entries_of,
    read_manifest,
)
from loco.engine.flat import intersect

RANGE_STREAMS = (
    "master",
    "optim.exp_avg",
    "optim.exp_avg_sq",
    "optim.momentum",
    "outer.phi",
    "outer.momentum",
    "outer.ef_residual",
)
"""The range streams a checkpoint may hold (``manifest["streams"]`` lists those it holds)."""


class Checkpoint:
    """A committed checkpoint directory, opened for reading.

    Args:
        path: the ``step_NNNNNNN`` directory (or its ``manifest.json``).
        verify: check each entry's CRC-32 before using it.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        p = Path(path)
        self.path = p.parent if p.name == MANIFEST else p
        self.manifest = read_manifest(self.path)
        self.verify = verify
        self.files: list[dict[str, Any]] = self.manifest["files"]
        self.entries = [entries_of(f) for f in self.files]
        self.numel = int(self.manifest["layout"]["numel"])
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def streams(self) -> list[str]:
        return list(self.manifest["streams"])

    @property
    def world(self) -> int:
        return len(self.files)

    def has(self, stream: str) -> bool:
        return stream in self.manifest["streams"]

    def scalars(self, rank: int) -> dict[str, Any]:
        return self.files[rank]["scalars"]

    def entry(self, rank: int, name: str) -> torch.Tensor:
        """Entry ``name`` of rank ``rank``'s file, checked, as a CPU tensor of its dtype/shape."""
        key = (rank, name)
        if key in self._cache:
            return self._cache[key]
        f = self.files[rank]
        if name not in self.entries[rank]:
            raise CheckpointError(f"{self.path / f['path']} has no entry {name!r}")
        e: Entry = self.entries[rank][name]
        path = self.path / f["path"]
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb", buffering=0) as fh:
                fh.seek(e.offset)
                got = fh.readinto(memoryview(raw.numpy()))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing; the checkpoint {self.path} is incomplete, resume from another"
            ) from None
        if got != e.nbytes:
            raise CheckpointError(
                f"{path} is truncated (entry {name!r} needs bytes {e.offset}..{e.offset + e.nbytes}"
                f"); delete {self.path} and resume from an older checkpoint"
            )
        if self.verify and zlib.crc32(raw.numpy()) != e.crc32:
            raise CheckpointError(
                f"{path} is corrupt (entry {name!r} fails its CRC-32); delete {self.path} and "
                "resume from an older checkpoint"
            )
        t = raw.view(e.torch_dtype).view(e.shape)
        self._cache[key] = t
        return t

    def read_range(self, stream: str, lo: int, hi: int) -> torch.Tensor:
        """Range stream ``stream`` on the global flat range ``[lo, hi)``, as a new fp32 tensor."""
        if not self.has(stream):
            raise CheckpointError(f"{self.path} holds no {stream!r}; it holds {self.streams}")
        if not 0 <= lo <= hi <= self.numel:
            raise ValueError(f"range [{lo}, {hi}) is outside the flat vector [0, {self.numel})")
        out = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        for r, f in enumerate(self.files):
            a, b = f["range"]
            piece = intersect((lo, hi), (a, b))
            if piece is None:
                continue
            src = self.entry(r, stream)
            out[piece[0] - lo : piece[1] - lo] = src[piece[0] - a : piece[1] - a]
            covered += piece[1] - piece[0]
        if covered != hi - lo:
            raise CheckpointError(
                f"{self.path / MANIFEST}: the rank files cover {covered} of the {hi - lo} values "
                f"of [{lo}, {hi}); the manifest is inconsistent, resume from another checkpoint"
            )
        return out

    def drop_cache(self) -> None:
        self._cache.clear()


def load_full(path: str | Path, what: tuple[str, ...] = ("master",)) -> dict[str, torch.Tensor]:
    """Full-length (P) fp32 flat vectors of the range streams ``what``, from all rank files."""
    ck = Checkpoint(path)
    return {s: ck.read_range(s, 0, ck.numel) for s in what}


def model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from checkpoint ``path``: every trainable parameter, named and
    shaped, from the fp32 master vector via the layout (tied names included), plus the frozen
    parameters and buffers saved beside it. Loads with ``model.load_state_dict``."""
    ck = Checkpoint(path)
    master = ck.read_range("master", 0, ck.numel)
    out: dict[str, torch.Tensor] = {}
    for p in ck.manifest["layout"]["params"]:
        out[p["name"]] = master[p["offset"] : p["offset"] + p["numel"]].view(p["shape"])
    for alias, name in ck.manifest.get("aliases", {}).items():
        out[alias] = out[name]
    for name in ck.entries[0]:
        for prefix in ("frozen.", "buffer."):
            if name.startswith(prefix):
                out[name[len(prefix) :]] = ck.entry(0, name).clone()
    return out
