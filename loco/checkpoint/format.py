"""The universal checkpoint format: directory names, the manifest, and rank-file entries.

A site's checkpoint directory holds committed checkpoints ``step_NNNNNNN/``, a ``latest`` file
naming the newest one, and at most a few uncommitted ``.tmp-step_NNNNNNN/`` directories left by
a crash (ignored by readers, removed by the next commit). A committed checkpoint holds
``manifest.json`` and one ``rank_RRRRR.bin`` per rank of the saving site. A rank file is the
concatenation of raw little-endian tensors ("entries"), each starting at a multiple of
:data:`ALIGN` bytes; the manifest gives every entry's name, dtype, shape, byte offset, byte
length and CRC-32. ``docs/checkpoint.md`` writes the format down byte by byte.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "loco-universal-checkpoint"
VERSION = 1
ALIGN = 64
"""Every entry of a rank file starts at a multiple of this many bytes."""
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_RE = re.compile(r"step_(\d{7,})")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

assert sys.byteorder == "little", "rank files are little-endian raw bytes"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the file and the fix."""


@dataclass
class Entry:
    """One tensor in a rank file: ``nbytes`` raw bytes at ``offset``, checksum ``crc32``."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    crc32: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.bin"


def part_file(rank: int) -> str:
    """The per-rank part manifest a rank writes into the temporary directory."""
    return f"rank_{rank:05d}.json"


def plan(tensors: dict[str, torch.Tensor]) -> tuple[list[Entry], int]:
    """Entries (in the dict's order) for ``tensors``, aligned; and the total file size."""
    entries, pos = [], 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"checkpoint entry {name!r} has dtype {t.dtype}, not storable")
        nbytes = t.numel() * t.element_size()
        entries.append(Entry(name, DTYPE_NAMES[t.dtype], list(t.shape), pos, nbytes))
        pos += -(-nbytes // ALIGN) * ALIGN
    return entries, pos


def layout_json(layout: Any) -> dict[str, Any]:
    """The flat layout (``loco.engine.flat.FlatLayout``) as written in the manifest."""
    return {
        "hash": layout.hash,
        "numel": layout.numel,
        "params": [
            {"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel}
            for s in layout.specs
        ],
    }


def steps(directory: str | Path) -> list[int]:
    """Steps of the committed checkpoints (a directory with a manifest) in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = STEP_RE.fullmatch(p.name)
        if m and (p / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The committed checkpoint that ``directory/latest`` names, or None when there is none."""
    d = Path(directory)
    ptr = d / LATEST
    if not ptr.exists():
        return None
    name = ptr.read_text().strip()
    old = d / f"{TMP_PREFIX}old-{name}"
    if STEP_RE.fullmatch(name) and not (d / name).exists() and (old / MANIFEST).is_file():
        # the writer crashed while replacing a step saved twice: the old copy is whole; put it back
        try:
            old.rename(d / name)
        except OSError:  # another rank put it back first
            pass
    if not STEP_RE.fullmatch(name) or not (d / name / MANIFEST).is_file():
        raise CheckpointError(
            f"{ptr} names {name!r}, which is not a committed checkpoint in {d}; point it to one "
            f"of {[step_name(s) for s in steps(d)]} or delete it"
        )
    return d / name


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` (its directory or its ``manifest.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{p} does not exist; give a committed step_NNNNNNN directory"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is corrupt ({e}); resume from another checkpoint") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a loco checkpoint manifest; resume from another one")
    if m.get("version") != VERSION:
        raise CheckpointError(
            f"{p} has format version {m.get('version')}, this loco reads {VERSION}; "
            "use the loco that wrote it"
        )
    return m


def entries_of(file_meta: dict[str, Any]) -> dict[str, Entry]:
    return {e["name"]: Entry(**e) for e in file_meta["entries"]}
