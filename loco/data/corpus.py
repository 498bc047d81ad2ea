"""Corpora as one memmapped token array plus a table of documents.

The embedded default is the source code of the running interpreter's standard library
(``sysconfig``'s ``stdlib`` path, ``*.py`` files in sorted order, ``site-packages`` excluded),
tokenized as bytes (vocabulary 256) and cached on first use as ``<cache>/<key>.tokens`` (raw
uint8) with ``<key>.docs.json`` (document offsets and top-level package). A user's text file
is cached the same way; a nanoGPT-style uint16 ``.bin`` file is memmapped in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loco.fsutil import atomic_write

DOC_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Document:
    start: int
    end: int
    group: str  # top-level package (or file) name: the unit of the non-iid split
    name: str


@dataclass
class Corpus:
    """Tokens of a whole corpus and its documents (contiguous, in order, covering it)."""

    tokens: np.ndarray  # 1-D memmap, uint8 (bytes) or uint16 (GPT-2 style ids)
    docs: list[Document]
    vocab_size: int
    name: str
    val_tokens: np.ndarray | None = None  # a separate validation file, if the user gave one

    @property
    def tokens_are_bytes(self) -> bool:
        return self.tokens.dtype == np.uint8


def default_cache_dir() -> Path:
    env = os.environ.get("LOCO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loco" / "data"


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files, sorted by their path relative to the root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if "site-packages" not in f.parts and "__pycache__" not in f.parts and f.is_file()
    ]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _cached(key: str, cache_dir: Path, build) -> tuple[np.ndarray, list[Document]]:
    tok_path = cache_dir / f"{key}.tokens"
    doc_path = cache_dir / f"{key}.docs.json"
    if not (tok_path.exists() and doc_path.exists()):
        data, docs = build()
        # tokens first, index last: the index's presence marks a complete cache entry
        atomic_write(tok_path, data)
        atomic_write(doc_path, json.dumps([d.__dict__ for d in docs]).encode())
    docs = [Document(**d) for d in json.loads(doc_path.read_text())]
    size = tok_path.stat().st_size
    if not docs or docs[-1].end != size:
        raise ValueError(
            f"corpus cache {tok_path} does not match its index (size {size}); delete both files "
            "and run again to rebuild it"
        )
    return np.memmap(tok_path, dtype=np.uint8, mode="r"), docs


def stdlib_corpus(cache_dir: str | Path | None = None) -> Corpus:
    """The Python standard library's source as bytes, one document per file."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    root, files = stdlib_files()
    if not files:
        raise ValueError(f"no .py files under the standard library at {root}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(str(f.stat().st_size).encode())
    key = f"stdlib-{h.hexdigest()[:16]}"

    def build() -> tuple[bytes, list[Document]]:
        parts, docs, pos = [], [], 0
        for f in files:
            rel = f.relative_to(root).as_posix()
            data = f.read_bytes() + DOC_SEPARATOR
            top = rel.split("/")[0] if "/" in rel else rel.removesuffix(".py")
            docs.append(Document(pos, pos + len(data), top, rel))
            parts.append(data)
            pos += len(data)
        return b"".join(parts), docs

    tokens, docs = _cached(key, cache_dir, build)
    return Corpus(tokens=tokens, docs=docs, vocab_size=256, name="stdlib")


def text_corpus(path: str | Path, cache_dir: str | Path | None = None) -> Corpus:
    """A text file as bytes; one document (the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path={path} is not a file; give a UTF-8 text file")
    size = path.stat().st_size
    if size < 2:
        raise ValueError(f"data.path={path} holds {size} bytes; a corpus needs more text")
    # bytes are tokens: the file itself is the token array, no copy needed
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    return Corpus(
        tokens=tokens,
        docs=[Document(0, size, path.stem, path.name)],
        vocab_size=256,
        name=path.name,
    )


def bin_corpus(
    path: str | Path, val_path: str | Path | None = None, vocab_size: int = 50257
) -> Corpus:
    """A nanoGPT-style file of uint16 token ids (and optionally its validation file)."""

    def load(p: str | Path) -> np.ndarray:
        p = Path(p)
        if not p.is_file():
            raise ValueError(f"token file {p} does not exist; give a uint16 .bin file")
        if p.stat().st_size % 2 or p.stat().st_size < 4:
            raise ValueError(
                f"token file {p} has {p.stat().st_size} bytes; a uint16 .bin has an even size >= 4"
            )
        return np.memmap(p, dtype=np.uint16, mode="r")

    tokens = load(path)
    val = load(val_path) if val_path else None
    return Corpus(
        tokens=tokens,
        docs=[Document(0, len(tokens), Path(path).stem, Path(path).name)],
        vocab_size=vocab_size,
        name=Path(path).name,
        val_tokens=val,
    )


def load_corpus(
    source: str,
    path: str | None = None,
    val_path: str | None = None,
    cache_dir: str | None = None,
    vocab_size: int | None = None,
) -> Corpus:
    """Load a corpus by source name: ``stdlib``, ``text`` or ``bin``."""
    if source == "stdlib":
        return stdlib_corpus(cache_dir)
    if source == "text":
        assert path is not None
        return text_corpus(path, cache_dir)
    if source == "bin":
        assert path is not None
        return bin_corpus(path, val_path, vocab_size=vocab_size or 50257)
    raise ValueError(f"unknown data source {source!r}; choose stdlib, text or bin")
