"""The universal checkpoint format: directory names, the manifest, and rank-file entries.

A site's checkpoint directory holds committed checkpoints ``step_NNNNNNN/``, a ``latest`` file
naming the newest one, and at most a few uncommitted ``.tmp-step_NNNNNNN/`` directories left by
a crash (ignored by readers, removed by the next commit). A committed checkpoint holds
``manifest.json`` and one ``rank_RRRRR.bin`` per rank of the saving site. A rank file is the
concatenation of raw little-endian tensors ("entries"), each starting at a multiple of
:data:`ALIGN` bytes; the manifest gives every entry's name, dtype, shape, byte offset, byte
length and CRC-32, and carries a CRC-32 of its own (``manifest_crc32``).
``docs/checkpoint.md`` writes the format down byte by byte.

A manifest is hostile until checked: :func:`read_manifest` verifies its checksum and
:func:`validate_manifest` every key, type, range and entry before anything is read or sized
by it; any fault is one :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import math
import re
import stat
import sys
import zlib
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

FORMAT = "loco-universal-checkpoint"
VERSION = 1
ALIGN = 64
"""Every entry of a rank file starts at a multiple of this many bytes."""
MANIFEST = "manifest.json"
MANIFEST_CRC = "manifest_crc32"
"""The manifest's own CRC-32, over :func:`canonical_json` of the manifest without this key."""
MAX_MANIFEST_BYTES = 64 << 20
"""A larger ``manifest.json`` is refused before it is read."""
MAX_NDIM = 64
MAX_INT = 1 << 62
"""No size, offset, count or range bound in a manifest exceeds this."""
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

RANGE_STREAMS = (
    "master",
    "optim.exp_avg",
    "optim.exp_avg_sq",
    "optim.momentum",
    "outer.phi",
    "outer.momentum",
    "outer.ef_residual",
    "outer.landing_miss",
)
"""The range streams a checkpoint may hold (``manifest["streams"]`` lists those it holds)."""

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
    try:
        with open(ptr, "rb") as fh:
            name = fh.read(256).decode("ascii", "replace").strip()  # longer: names nothing
    except OSError as e:
        raise CheckpointError(f"{ptr} cannot be read ({e}); delete it") from None
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


def canonical_json(m: dict[str, Any]) -> bytes:
    """``m`` as sorted, compact JSON: the bytes the manifest checksum covers."""
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode()


def manifest_crc32(m: dict[str, Any]) -> int:
    """CRC-32 of the canonical JSON of manifest ``m`` without its :data:`MANIFEST_CRC` key.

    ``m`` must be what JSON gives back (string keys, lists): the writer round-trips first."""
    return zlib.crc32(canonical_json({k: v for k, v in m.items() if k != MANIFEST_CRC}))


def _load_json(p: Path) -> Any:
    """The parsed JSON of file ``p``, refused before reading when over the size bound."""
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{p} is not a regular file; resume from another checkpoint")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(
                f"{p} is {st.st_size} bytes, over the bound of {MAX_MANIFEST_BYTES}; "
                "it is not a loco manifest, resume from another checkpoint"
            )
        with open(p, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(
            f"{p} does not exist; give a committed step_NNNNNNN directory"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{p} cannot be read ({e}); resume from another checkpoint") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{p} grew past {MAX_MANIFEST_BYTES} bytes while being read")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{p} is corrupt ({reason}); resume from another checkpoint"
        ) from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` (its directory or its ``manifest.json``), its
    checksum verified (when it has one) and every field validated (:func:`validate_manifest`).
    Raises :class:`CheckpointError` for anything else."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    m = _load_json(p)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a loco checkpoint manifest; resume from another one")
    version = m.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(
            f"{p} has format version {_show(version)}, this loco reads {VERSION}; "
            "use the loco that wrote it"
        )
    if MANIFEST_CRC in m:  # absent in manifests written by an older loco
        try:
            ok = type(m[MANIFEST_CRC]) is int and m[MANIFEST_CRC] == manifest_crc32(m)
        except (ValueError, RecursionError):  # unencodable or too deep: not what was written
            ok = False
        if not ok:
            raise CheckpointError(f"{p} fails its checksum; resume from another checkpoint")
    validate_manifest(m, p)
    return m


def _show(x: Any) -> str:
    """A short, one-line rendering of a hostile value for an error message."""
    if isinstance(x, (dict, list)):
        return f"a JSON {'object' if isinstance(x, dict) else 'array'}"
    r = repr(x) if not isinstance(x, int) or abs(x) < 10**30 else "a huge integer"
    return r if len(r) <= 40 else r[:37] + "..."


def _nat(x: Any) -> bool:
    """``x`` is a JSON integer in ``[0, MAX_INT]`` (not a bool, not a float)."""
    return type(x) is int and 0 <= x <= MAX_INT


def _shape_ok(x: Any) -> bool:
    return isinstance(x, list) and len(x) <= MAX_NDIM and all(_nat(d) for d in x)


class _Check:
    """Raises the one-line manifest error for ``path`` when a condition fails."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, cond: bool, what: str) -> None:
        if not cond:
            raise CheckpointError(
                f"{self.path} is not a valid checkpoint manifest ({what}); "
                "resume from another checkpoint"
            )


def validate_manifest(m: dict[str, Any], path: str | Path) -> None:
    """Check every field a reader uses, before anything is read or allocated from it.

    The layout (``numel`` >= 0, ``hash``, ``params`` inside ``[0, numel)``), ``step``,
    ``streams``, ``aliases``, and ``files``: a non-empty list whose record ``r`` has path
    :func:`rank_file` ``(r)`` and a ``range`` such that the ranges partition ``[0, numel)`` in
    rank order (an empty range only at ``numel``: a trailing rank whose shard is all padding);
    entries as :func:`_check_entries` says. Raises :class:`CheckpointError` naming ``path``.
    """
    need = _Check(Path(path))
    lay = m.get("layout")
    need(isinstance(lay, dict), "no 'layout' object")
    numel = lay.get("numel")
    need(_nat(numel), f"layout.numel is {_show(numel)}, not an integer in [0, 2**62]")
    need(isinstance(lay.get("hash"), str), "layout.hash is not a string")
    params = _check_params(lay.get("params", []), numel, need)
    aliases = m.get("aliases", {})
    need(isinstance(aliases, dict), "'aliases' is not an object")
    for k, v in aliases.items():
        need(isinstance(v, str) and v in params, f"alias {_show(k)} names no layout parameter")
    need(_nat(m.get("step")), f"step is {_show(m.get('step'))}, not an integer in [0, 2**62]")
    streams = m.get("streams", [])
    need(
        isinstance(streams, list) and all(isinstance(s, str) for s in streams),
        "'streams' is not a list of names",
    )
    files = m.get("files")
    need(isinstance(files, list) and len(files) > 0, "'files' is not a non-empty list")
    world = m.get("world", len(files))
    need(world == len(files) and type(world) is int, f"world {_show(world)} != len(files)")
    end = 0
    for r, f in enumerate(files):
        end = _check_file(f, r, end, numel, streams, need)
    need(end == numel, f"the ranges end at {end}, not at layout.numel {numel}")


def _check_params(params: Any, numel: int, need: _Check) -> set[str]:
    """``layout.params``: each ``{name, shape, offset, numel}`` inside ``[0, numel)``."""
    need(isinstance(params, list), "layout.params is not a list")
    names = set()
    for i, s in enumerate(params):
        at = f"layout.params[{i}]"
        need(isinstance(s, dict) and isinstance(s.get("name"), str), f"{at} has no name")
        n, off = s.get("numel"), s.get("offset")
        need(_nat(n) and _nat(off), f"{at} has no integer offset and numel >= 0")
        need(off + n <= numel, f"{at} [{off}, {off + n}) is outside [0, {numel})")
        need(_shape_ok(s.get("shape")) and math.prod(s["shape"]) == n, f"{at}: shape != numel")
        names.add(s["name"])
    return names


_SCALARS = ("optim_step", "outer_rounds", "ef_calls")


def _check_file(f: Any, r: int, start: int, numel: int, streams: list, need: _Check) -> int:
    """File record ``r``: its path, its range (starting at ``start``), scalars and entries;
    returns where its range ends."""
    at = f"files[{r}]"
    need(isinstance(f, dict), f"{at} is not an object")
    path = f.get("path")
    need(path == rank_file(r), f"{at}.path is {_show(path)}, not {rank_file(r)!r}")
    need(f.get("rank", r) == r, f"{at}.rank is {_show(f.get('rank'))}, not {r}")
    rng = f.get("range")
    need(isinstance(rng, list) and len(rng) == 2 and all(_nat(x) for x in rng),
         f"{at}.range is not [lo, hi] with integers in [0, 2**62]")  # fmt: skip
    lo, hi = rng
    need(lo == start, f"{at}.range [{lo}, {hi}) does not start where the previous one ends "
         f"({start}): the ranges must tile [0, {numel}) in rank order")  # fmt: skip
    need(lo <= hi <= numel, f"{at}.range [{lo}, {hi}) is not inside [0, {numel})")
    need(hi > lo or lo == numel, f"{at}.range [{lo}, {hi}) is empty before the end {numel}")
    size = f.get("bytes")
    need(size is None or _nat(size), f"{at}.bytes is {_show(size)}, not an integer in [0, 2**62]")
    scalars = f.get("scalars", {})
    need(isinstance(scalars, dict), f"{at}.scalars is not an object")
    for k in _SCALARS:
        need(_nat(scalars.get(k, 0)), f"{at}.scalars.{k} is not an integer in [0, 2**62]")
    _check_entries(f.get("entries"), at, hi - lo, size, streams, need)
    return hi


def _check_entries(es: Any, at: str, n: int, size: int | None, streams: list,
                   need: _Check) -> None:  # fmt: skip
    """Entries of one file: unique names, a known dtype, ``shape`` of ints >= 0, ``nbytes ==
    prod(shape) * itemsize``, ``offset`` a multiple of :data:`ALIGN`, a 32-bit ``crc32``, no
    two overlapping, all inside ``size`` (when known); each range stream ``[n]`` float32, and
    every stream in ``streams`` present."""
    need(isinstance(es, list), f"{at}.entries is not a list")
    spans, names = [], set()
    ranged = set(RANGE_STREAMS).union(streams)
    for i, e in enumerate(es):
        where = f"{at}.entries[{i}]"
        need(isinstance(e, dict) and isinstance(e.get("name"), str), f"{where} has no name")
        name, dtype, shape = e["name"], e.get("dtype"), e.get("shape")
        where = f"{at} entry {_show(name)}"
        need(name not in names, f"{where} appears twice")
        names.add(name)
        need(isinstance(dtype, str) and dtype in DTYPES, f"{where} has dtype {_show(dtype)}")
        need(_shape_ok(shape), f"{where} has shape {_show(shape)}, not a list of ints >= 0")
        off, nbytes, crc = e.get("offset"), e.get("nbytes"), e.get("crc32")
        need(_nat(off) and off % ALIGN == 0, f"{where} offset {_show(off)} is not k * {ALIGN}")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        need(nbytes == want and type(nbytes) is int,
             f"{where} nbytes {_show(nbytes)} != {want} (its shape and dtype)")  # fmt: skip
        need(_nat(crc) and crc < 1 << 32, f"{where} crc32 {_show(crc)} is not a CRC-32")
        if name in ranged:
            need(dtype == "float32" and shape == [n], f"{where} is not [{n}] float32 (its range)")
        need(size is None or off + nbytes <= size, f"{where} ends past the file's {size} bytes")
        spans.append((off, nbytes, name))
    spans.sort()
    for (o1, n1, a), (o2, _, b) in pairwise(spans):
        need(o1 + n1 <= o2, f"{at} entries {_show(a)} and {_show(b)} overlap")
    for s in streams:
        need(s in names, f"{at} has no entry for stream {_show(s)}")


def entries_of(file_meta: dict[str, Any]) -> dict[str, Entry]:
    """The entries of a validated file record, by name."""
    keys = ("name", "dtype", "shape", "offset", "nbytes", "crc32")
    return {e["name"]: Entry(**{k: e[k] for k in keys}) for e in file_meta["entries"]}
