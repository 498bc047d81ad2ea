"""A checkpoint manifest is hostile until checked: every malformed, inconsistent or tampered
manifest is one :class:`CheckpointError` (never another exception, never a read outside the
checkpoint, never a buffer sized by an unchecked field); a valid one, with or without its own
checksum, loads exactly.

Each case starts from a real checkpoint written by the project's writer at 3 ranks (ranges
``[0, 50)``, ``[50, 100)`` and the trailing empty ``[100, 100)``), mutates its ``manifest.json``
and, unless the case is about the checksum, re-seals it with a correct checksum so that the
structural check, not the checksum, is what must catch it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loco.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, latest_checkpoint
from loco.checkpoint.format import ALIGN, MANIFEST, MANIFEST_CRC, manifest_crc32, rank_file
from loco.site_comm import SiteComm
from tests.engine.dist_utils import run_ranks
from tests.hostile.rss import peak_growth_mib

P = 100
RANGES = [(0, 50), (50, 100), (100, 100)]  # the last rank's shard is all padding
STREAMS = ["master", "optim.exp_avg"]


def values() -> dict[str, torch.Tensor]:
    x = torch.arange(P, dtype=torch.float32) * 0.5
    return {"master": x, "optim.exp_avg": x + 1000.0}


def _write_rank(rank: int, world: int, d: str) -> None:
    lo, hi = RANGES[rank]
    tensors = {k: v[lo:hi].clone() for k, v in values().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if rank == 0:
        tensors["buffer.scale"] = torch.ones(3, 5, dtype=torch.float16)
    layout = {"hash": "t", "numel": P,
              "params": [{"name": "w", "shape": [10, 10], "offset": 0, "numel": P}]}  # fmt: skip
    w = CheckpointWriter(d, comm=SiteComm(), meta={"layout": layout,
                         "aliases": {"w_tied": "w"}})  # fmt: skip
    w.save(7, tensors, range=(lo, hi), scalars={"optim_step": 7},
           manifest={"streams": STREAMS})  # fmt: skip
    w.wait()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed 3-rank checkpoint written by CheckpointWriter (shared: copy before changing)."""
    d = tmp_path_factory.mktemp("ckpt")
    run_ranks(_write_rank, len(RANGES), str(d))
    path = latest_checkpoint(d)
    assert path is not None
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / saved.name
    shutil.copytree(saved, dst)
    return dst


def load(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def store(path: Path, m: dict[str, Any] | bytes, *, seal: bool = True) -> None:
    """Write manifest ``m`` (a dict: with a fresh checksum when ``seal``; bytes: as is)."""
    if isinstance(m, dict):
        m.pop(MANIFEST_CRC, None)
        if seal:
            m[MANIFEST_CRC] = manifest_crc32(json.loads(json.dumps(m)))
        m = json.dumps(m).encode()
    (path / MANIFEST).write_bytes(m)


def ent(m: dict[str, Any], rank: int, name: str) -> dict[str, Any]:
    return next(e for e in m["files"][rank]["entries"] if e["name"] == name)


def relayout(f: dict[str, Any]) -> None:
    """Re-assign the file record's entry offsets in order, aligned, as the writer's plan does."""
    pos = 0
    for e in f["entries"]:
        e["offset"] = pos
        pos += -(-e["nbytes"] // ALIGN) * ALIGN


def _set(m: dict, keys: tuple, v: Any) -> None:
    for k in keys[:-1]:
        m = m[k]
    m[keys[-1]] = v


def _del(m: dict, keys: tuple) -> None:
    for k in keys[:-1]:
        m = m[k]
    del m[keys[-1]]


def _huge_entry(m: dict) -> None:
    """rng.torch of rank 0 claims 2**40 bytes, shape and nbytes consistent."""
    e = ent(m, 0, "rng.torch")
    e["shape"], e["nbytes"] = [1 << 40], 1 << 40
    relayout(m["files"][0])


def _huge_stream(m: dict) -> None:
    """P = 2**38: rank 1's stream entries claim (2**38 - 50) values each, no `bytes` field."""
    n = 1 << 38
    m["layout"]["numel"] = n
    m["files"][1]["range"][1] = n
    m["files"][2]["range"] = [n, n]
    for name in STREAMS:
        e = ent(m, 1, name)
        e["shape"], e["nbytes"] = [n - 50], (n - 50) * 4
    relayout(m["files"][1])
    del m["files"][1]["bytes"]


def _past_end(m: dict, drop_bytes: bool) -> None:
    f = m["files"][0]
    e = ent(m, 0, "rng.torch")
    e["offset"] = -(-f["bytes"] // ALIGN) * ALIGN  # aligned, where the file ends
    if drop_bytes:
        del f["bytes"]


OPEN, READ = "open", "read"
Mutation = Callable[[dict[str, Any]], Any]
CASES: list[tuple[str, Mutation, str, str]] = [
    # (id, mutation of the manifest dict (or a function returning raw bytes), action, match)
    ("overlapping-ranges", lambda m: _set(m, ("files", 1, "range"), [0, 50]), OPEN,
     r"files\[1\]\.range \[0, 50\) does not start where the previous one ends \(50\)"),
    ("gap", lambda m: _set(m, ("files", 1, "range"), [60, 100]), OPEN, "does not start where"),
    ("out-of-order", lambda m: (_set(m, ("files", 0, "range"), [50, 100]),
                                _set(m, ("files", 1, "range"), [0, 50])), OPEN,
     r"files\[0\]\.range \[50, 100\) does not start"),
    ("short-of-numel", lambda m: (m["files"].pop(), _set(m, ("world",), 2),
                                  _set(m, ("layout", "numel"), 120)), OPEN,
     "the ranges end at 100, not at layout.numel 120"),
    ("range-past-numel", lambda m: _set(m, ("files", 1, "range"), [50, 120]), OPEN,
     r"\[50, 120\) is not inside"),
    ("range-not-pair", lambda m: _set(m, ("files", 0, "range"), [0]), OPEN, "range is not"),
    ("empty-range-midway", lambda m: (_set(m, ("files", 0, "range"), [0, 0]),
                                      _set(m, ("files", 1, "range"), [0, 100])), OPEN,
     r"files\[0\]\.range \[0, 0\) is empty before the end"),
    ("nbytes-2**40", lambda m: _set(ent(m, 0, "rng.torch"), ("nbytes",), 1 << 40), OPEN,
     "nbytes 1099511627776 !="),
    ("nbytes-2**40-consistent", _huge_entry, OPEN, "ends past the file's"),
    ("nbytes-negative", lambda m: _set(ent(m, 0, "master"), ("nbytes",), -1), OPEN,
     "nbytes -1 !="),
    ("nbytes-float", lambda m: _set(ent(m, 0, "master"), ("nbytes",), 200.0), OPEN,
     "nbytes 200.0 !="),
    ("shape-disagrees", lambda m: _set(ent(m, 0, "buffer.scale"), ("shape",), [3, 4]), OPEN,
     r"nbytes 30 != 24"),
    ("shape-negative", lambda m: _set(ent(m, 0, "buffer.scale"), ("shape",), [-3, -5]), OPEN,
     "has shape"),
    ("shape-not-list", lambda m: _set(ent(m, 0, "buffer.scale"), ("shape",), "3x5"), OPEN,
     "has shape"),
    ("unknown-dtype", lambda m: _set(ent(m, 0, "buffer.scale"), ("dtype",), "complex64"), OPEN,
     "has dtype 'complex64'"),
    ("dtype-unhashable", lambda m: _set(ent(m, 0, "buffer.scale"), ("dtype",), []), OPEN,
     "has dtype"),
    ("stream-not-its-range", lambda m: _set(ent(m, 0, "master"), ("shape",), [25, 2]), OPEN,
     r"is not \[50\] float32"),
    ("stream-missing", lambda m: m["files"][1]["entries"].remove(ent(m, 1, "optim.exp_avg")),
     OPEN, "has no entry for stream 'optim.exp_avg'"),
    ("no-layout", lambda m: _del(m, ("layout",)), OPEN, "no 'layout' object"),
    ("numel-string", lambda m: _set(m, ("layout", "numel"), "100"), OPEN, "layout.numel is"),
    ("numel-negative", lambda m: _set(m, ("layout", "numel"), -1), OPEN, "layout.numel is -1"),
    ("no-hash", lambda m: _del(m, ("layout", "hash")), OPEN, "layout.hash"),
    ("param-outside", lambda m: _set(m, ("layout", "params", 0, "offset"), 50), OPEN,
     r"layout\.params\[0\] \[50, 150\) is outside"),
    ("alias-to-nothing", lambda m: _set(m, ("aliases", "x"), "nope"), OPEN, "alias 'x'"),
    ("no-step", lambda m: _del(m, ("step",)), OPEN, "step is None"),
    ("no-files", lambda m: _del(m, ("files",)), OPEN, "'files' is not a non-empty list"),
    ("files-empty", lambda m: _set(m, ("files",), []), OPEN, "'files' is not a non-empty"),
    ("files-object", lambda m: _set(m, ("files",), {"0": {}}), OPEN, "'files' is not"),
    ("file-not-object", lambda m: _set(m, ("files", 2), 7), OPEN, r"files\[2\] is not an"),
    ("world-mismatch", lambda m: _set(m, ("world",), 2), OPEN, "world 2 != len"),
    ("no-entries", lambda m: _del(m, ("files", 0, "entries")), OPEN, "entries is not a list"),
    ("entry-no-name", lambda m: _del(ent(m, 0, "master"), ("name",)), OPEN, "has no name"),
    ("entry-twice", lambda m: m["files"][0]["entries"].append(ent(m, 0, "master")), OPEN,
     "appears twice"),
    ("no-crc", lambda m: _del(ent(m, 0, "master"), ("crc32",)), OPEN, "crc32 None"),
    ("scalar-string", lambda m: _set(m, ("files", 0, "scalars", "optim_step"), "7"), OPEN,
     "scalars.optim_step"),
    ("path-parent", lambda m: _set(m, ("files", 0, "path"), "../x"), OPEN,
     r"files\[0\]\.path is '\.\./x', not 'rank_00000\.bin'"),
    ("path-absolute", lambda m: _set(m, ("files", 0, "path"), "/etc/passwd"), OPEN,
     "path is '/etc/passwd'"),
    ("path-of-another-rank", lambda m: _set(m, ("files", 0, "path"), rank_file(1)), OPEN,
     r"path is 'rank_00001\.bin', not 'rank_00000\.bin'"),
    ("path-missing", lambda m: _del(m, ("files", 1, "path")), OPEN, "path is None"),
    ("offset-unaligned", lambda m: _set(ent(m, 0, "optim.exp_avg"), ("offset",),
                                        ent(m, 0, "optim.exp_avg")["offset"] + 4), OPEN,
     f"is not k \\* {ALIGN}"),
    ("entries-overlap", lambda m: _set(ent(m, 0, "optim.exp_avg"), ("offset",), 0), OPEN,
     "overlap"),
    ("entry-past-bytes", lambda m: _past_end(m, drop_bytes=False), OPEN, "ends past the file's"),
    ("entry-past-file-end", lambda m: _past_end(m, drop_bytes=True), READ,
     r"rank_00000\.bin is truncated"),
    ("stream-past-file-end", _huge_stream, READ, r"rank_00001\.bin is truncated"),
    ("version-true", lambda m: _set(m, ("version",), True), OPEN, "format version True"),
    ("not-an-object", lambda m: b"[1, 2, 3]", OPEN, "not a loco checkpoint manifest"),
    ("not-utf8", lambda m: b'{"format": "\xff\xfe"}', OPEN, "is corrupt"),
    ("deep-nesting", lambda m: b"[" * 200_000 + b"]" * 200_000, OPEN, "is corrupt"),
    ("huge-int", lambda m: json.dumps(m).encode().replace(b'"step": 7', b'"step": ' + b"9" * 5000),
     OPEN, "is corrupt"),
]  # fmt: skip


def _act(path: Path, action: str) -> None:
    ck = Checkpoint(path)
    if action == READ:
        for s in ck.streams:
            ck.read_range(s, 0, ck.numel)
        for r, names in enumerate(ck.entries):
            for name in names:
                ck.entry(r, name)


@pytest.mark.parametrize(("mutate", "action", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_manifest_is_one_checkpoint_error(saved, tmp_path, mutate, action, match):
    path = copy_of(saved, tmp_path)
    m = load(path)
    out = mutate(m)
    store(path, out if isinstance(out, bytes) else m)
    with pytest.raises(CheckpointError, match=match) as e:
        _act(path, action)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert "resume from" in msg or "use the loco" in msg, msg


def test_tampered_value_fails_the_checksum(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    m = load(path)
    assert type(m[MANIFEST_CRC]) is int and m[MANIFEST_CRC] == manifest_crc32(m)
    m["files"][0]["scalars"]["optim_step"] = 8  # still valid, but not what was written
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest\.json fails its checksum; resume"):
        Checkpoint(path)
    m = load(saved)
    m[MANIFEST_CRC] = str(m[MANIFEST_CRC])  # the right value, ill-typed
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        Checkpoint(path)


def test_written_and_unsealed_manifests_load_exactly(saved, tmp_path):
    """The writer's manifest (checksum, trailing empty range) loads; without its checksum field
    (an older loco) an otherwise valid manifest loads too; both read back the saved values."""
    want = values()
    unsealed = copy_of(saved, tmp_path)
    m = load(unsealed)
    store(unsealed, m, seal=False)
    assert MANIFEST_CRC not in load(unsealed) and MANIFEST_CRC in load(saved)
    for path in (saved, unsealed):
        ck = Checkpoint(path)
        assert [f["range"] for f in ck.files] == [list(r) for r in RANGES]
        for s in STREAMS:
            assert torch.equal(ck.read_range(s, 0, P), want[s])
            assert torch.equal(ck.read_range(s, 40, 60), want[s][40:60])
        assert ck.read_range("master", 100, 100).numel() == 0
        assert ck.entry(0, "buffer.scale").dtype == torch.float16
        assert ck.scalars(1)["optim_step"] == 7


@pytest.mark.parametrize("mutate", [_huge_entry, _huge_stream], ids=["entry", "stream"])
def test_huge_claimed_sizes_allocate_nothing(saved, tmp_path, mutate):
    """An entry of 2**40 bytes (or a stream of 2**38 values) that the manifest alone cannot
    refute (no `bytes` field) is refused by the size of the file on disk, before any buffer."""
    path = copy_of(saved, tmp_path)
    m = load(path)
    mutate(m)
    for f in m["files"]:
        f.pop("bytes", None)
    store(path, m)
    setup = f"""
from loco.checkpoint import Checkpoint, CheckpointError
from loco.site_comm import SiteComm
path = {str(path)!r}
"""
    code = """
try:
    ck = Checkpoint(path)
    ck.entry(0, "rng.torch")
    ck.read_range("master", 0, ck.numel)
    __out = "no error"
except CheckpointError as e:
    __out = "CheckpointError: " + str(e)
except BaseException as e:
    __out = type(e).__name__ + ": " + str(e)
"""
    growth, out = peak_growth_mib(setup, code)
    assert out.startswith("CheckpointError: ") and "is truncated" in out, out
    assert growth < 50, growth
