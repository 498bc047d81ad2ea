"""A simple, replicated checkpoint: one file per step written by rank 0.

Layout under ``dir``: ``step_NNNNNNN.pt`` files and a ``latest`` file naming the newest one.
A checkpoint is committed atomically: the data goes to a temporary file that is fsynced and
renamed into place, and only then is ``latest`` replaced the same way, so a crash at any point
leaves the previous checkpoint loadable and ``latest`` pointing to it. Old checkpoints beyond
``keep`` are removed after the new one is committed.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from loco.fsutil import atomic_write

_NAME = re.compile(r"step_(\d{7,})\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


class SimpleCheckpointer:
    """Saves ``state`` dicts as ``step_NNNNNNN.pt`` with a sha256 of the payload in a header."""

    MAGIC = b"LOCOCKPT1\n"

    def __init__(self, directory: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.dir = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getvalue()
        digest = hashlib.sha256(payload).hexdigest().encode()
        path = self.path(step)
        atomic_write(path, self.MAGIC + digest + b"\n" + payload)
        atomic_write(self.dir / "latest", path.name.encode() + b"\n")
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.fullmatch(p.name)))

    def latest(self) -> Path | None:
        """The committed checkpoint ``latest`` names, or None when there is none."""
        ptr = self.dir / "latest"
        if not ptr.exists():
            return None
        name = ptr.read_text().strip()
        if not _NAME.fullmatch(name) or not (self.dir / name).exists():
            raise CheckpointError(
                f"{ptr} names {name!r}, which is not a checkpoint file in {self.dir}"
            )
        return self.dir / name

    def load(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        data = path.read_bytes()
        head = len(self.MAGIC) + 65
        if len(data) < head or not data.startswith(self.MAGIC):
            raise CheckpointError(
                f"{path} is not a loco checkpoint (bad header); delete it or resume from another"
            )
        digest, payload = data[len(self.MAGIC) : head - 1], data[head:]
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            raise CheckpointError(
                f"{path} is corrupt (checksum mismatch); delete it or resume from another"
            )
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
