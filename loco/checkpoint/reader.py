"""Reading universal checkpoints: verified entries, any flat range, full vectors, a model.

A *range stream* (``master``, ``optim.*``, ``outer.*``) is one fp32 vector of length P split
over the saving ranks: file ``r`` holds it on ``files[r].range``. :meth:`Checkpoint.read_range`
assembles any ``[lo, hi)`` by intersecting it with those ranges, so a checkpoint saved by N
ranks loads at any M ranks and any ZeRO stage. Every entry read is checked against its CRC-32
first; a mismatch is a :class:`CheckpointError` naming the file. The manifest is validated
when the checkpoint is opened (:func:`~loco.checkpoint.format.validate_manifest`), and every
entry's extent is checked against its file's size on disk before a byte is allocated for it.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import Any

import torch

from loco.checkpoint.format import (
    MANIFEST,
    RANGE_STREAMS,
    CheckpointError,
    Entry,
    entries_of,
    read_manifest,
)
from loco.engine.flat import intersect

__all__ = ["RANGE_STREAMS", "Checkpoint", "load_full", "model_state_dict"]


class Checkpoint:
    """A committed checkpoint directory, opened for reading.

    Args:
        path: the ``step_NNNNNNN`` directory (or its ``manifest.json``).
        verify: check each entry's CRC-32 before using it.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        p = Path(path)
        self.path = p.parent if p.name == MANIFEST else p
        self.manifest = read_manifest(self.path)  # validated: every field below is well-formed
        self.verify = verify
        self.files: list[dict[str, Any]] = self.manifest["files"]
        self.entries = [entries_of(f) for f in self.files]
        self.numel = int(self.manifest["layout"]["numel"])
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def streams(self) -> list[str]:
        return list(self.manifest.get("streams", []))

    @property
    def world(self) -> int:
        return len(self.files)

    def has(self, stream: str) -> bool:
        return stream in self.manifest.get("streams", [])

    def scalars(self, rank: int) -> dict[str, Any]:
        return self.files[rank].get("scalars", {})

    def _on_disk(self, rank: int, name: str) -> tuple[Entry, Path]:
        """Entry ``name`` of rank ``rank`` and its file, which holds all of the entry's bytes."""
        f = self.files[rank]
        path = self.path / f["path"]  # validated: exactly rank_file(rank)
        if name not in self.entries[rank]:
            raise CheckpointError(f"{path} has no entry {name!r}")
        e: Entry = self.entries[rank][name]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing; the checkpoint {self.path} is incomplete, resume from another"
            ) from None
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read ({err}); resume from another") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file; resume from another checkpoint")
        if st.st_size < e.offset + e.nbytes:
            raise CheckpointError(
                f"{path} is truncated (entry {name!r} needs bytes {e.offset}..{e.offset + e.nbytes}"
                f", the file has {st.st_size}); delete {self.path} and resume from an older "
                "checkpoint"
            )
        return e, path

    def entry(self, rank: int, name: str) -> torch.Tensor:
        """Entry ``name`` of rank ``rank``'s file, checked, as a CPU tensor of its dtype/shape.

        Its extent is checked against the file's size before its buffer is allocated."""
        key = (rank, name)
        if key in self._cache:
            return self._cache[key]
        e, path = self._on_disk(rank, name)
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb", buffering=0) as fh:
                fh.seek(e.offset)
                got = fh.readinto(memoryview(raw.numpy()))
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read ({err}); resume from another") from None
        if got != e.nbytes:  # shrank since the check
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
        """Range stream ``stream`` on the global flat range ``[lo, hi)``, as a new fp32 tensor.

        The pieces taken from the rank files are checked to tile ``[lo, hi)`` exactly, and each
        entry's extent against its file, before the output is allocated: every value of the
        output is written."""
        if not self.has(stream):
            raise CheckpointError(f"{self.path} holds no {stream!r}; it holds {self.streams}")
        if not 0 <= lo <= hi <= self.numel:
            raise ValueError(f"range [{lo}, {hi}) is outside the flat vector [0, {self.numel})")
        pieces, pos = [], lo
        for r, f in enumerate(self.files):
            a, b = f["range"]
            piece = intersect((lo, hi), (a, b))
            if piece is None:
                continue
            if piece[0] != pos:
                break
            if (r, stream) not in self._cache:
                self._on_disk(r, stream)
            pieces.append((r, a, piece))
            pos = piece[1]
        if pos != hi:  # unreachable for a validated manifest: its ranges partition [0, numel)
            raise CheckpointError(
                f"{self.path / MANIFEST}: the rank files do not tile [{lo}, {hi}) (a gap at "
                f"{pos}); the manifest is inconsistent, resume from another checkpoint"
            )
        out = torch.empty(hi - lo, dtype=torch.float32)
        for r, a, (p0, p1) in pieces:
            out[p0 - lo : p1 - lo] = self.entry(r, stream)[p0 - a : p1 - a]
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
    for p in ck.manifest["layout"].get("params", []):
        out[p["name"]] = master[p["offset"] : p["offset"] + p["numel"]].view(p["shape"])
    for alias, name in ck.manifest.get("aliases", {}).items():
        out[alias] = out[name]
    for name in ck.entries[0]:
        for prefix in ("frozen.", "buffer."):
            if name.startswith(prefix):
                out[name[len(prefix) :]] = ck.entry(0, name).clone()
    return out
