"""Corpora as one memmapped token array plus a table of documents.

The embedded default is the source code of the running interpreter's standard library
(``sysconfig``'s ``stdlib`` path, ``*.py`` files in sorted order, ``site-packages`` excluded),
tokenized as bytes (vocabulary 256) and cached on first use as ``<cache>/<key>.tokens`` (raw
uint8) with ``<key>.docs.json`` (document offsets and top-level package). A user's text file
is cached the same way; a nanoGPT-style uint16 ``.bin`` file is memmapped in place.

With ``tokenizer="bpe"`` a byte-level BPE is trained on the text corpus once (see
:mod:`loco.data.tokenizer`) and the corpus, tokenized with it document by document, is cached
as ``<cache>/<key>.bpe<V>-<sha>.tokens`` (uint16) with its ``.docs.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loco.data.tokenizer import (
    DEFAULT_BPE_VOCAB,
    Tokenizer,
    byte_tokenizer,
    cached_bpe,
    encode_documents,
    save_run_copy,
    text_pieces,
)
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
    tokenizer: Tokenizer | None = None  # None: token ids of unknown text (a .bin file)
    key: str = ""  # names the corpus's contents in the cache ("": not cached)

    @property
    def tokens_are_bytes(self) -> bool:
        return self.tokens.dtype == np.uint8

    @property
    def token_bytes(self) -> np.ndarray | None:
        """The number of text bytes each token id stands for (None: unknown, a .bin file)."""
        return None if self.tokenizer is None else self.tokenizer.token_bytes

    def save_tokenizer(self, run_dir: Path) -> None:
        """Copy a BPE tokenizer into ``run_dir``, where export and sample find it."""
        save_run_copy(self.tokenizer, run_dir)


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


def _cached(key: str, cache_dir: Path, build, dtype=np.uint8) -> tuple[np.ndarray, list[Document]]:
    tok_path = cache_dir / f"{key}.tokens"
    doc_path = cache_dir / f"{key}.docs.json"
    if not (tok_path.exists() and doc_path.exists()):
        data, docs = build()
        # tokens first, index last: the index's presence marks a complete cache entry
        atomic_write(tok_path, data)
        atomic_write(doc_path, json.dumps([d.__dict__ for d in docs]).encode())
    docs = [Document(**d) for d in json.loads(doc_path.read_text())]
    size = tok_path.stat().st_size
    if not docs or docs[-1].end * np.dtype(dtype).itemsize != size:
        raise ValueError(
            f"corpus cache {tok_path} does not match its index (size {size}); delete both files "
            "and run again to rebuild it"
        )
    return np.memmap(tok_path, dtype=dtype, mode="r"), docs


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
    return Corpus(tokens=tokens, docs=docs, vocab_size=256, name="stdlib",
                  tokenizer=byte_tokenizer(), key=key)  # fmt: skip


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
        tokenizer=byte_tokenizer(),
    )


def _content_key(tokens: np.ndarray) -> str:
    """A cache key naming a byte corpus by its contents."""
    h = hashlib.sha256()
    for i in range(0, len(tokens), 1 << 24):
        h.update(tokens[i : i + (1 << 24)].tobytes())
    return f"text-{h.hexdigest()[:16]}"


def bpe_corpus(corpus: Corpus, cache_dir: str | Path | None = None,
               vocab_size: int | None = None) -> Corpus:  # fmt: skip
    """The byte corpus ``corpus`` tokenized with a byte-level BPE of ``vocab_size`` tokens
    (default :data:`DEFAULT_BPE_VOCAB`) trained on its text; tokenizer and tokens cached."""
    if corpus.tokenizer is None or corpus.tokenizer.kind != "bytes":
        raise ValueError(f"a BPE needs a byte corpus of text; {corpus.name} is not one")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    vocab_size = vocab_size or DEFAULT_BPE_VOCAB
    key = corpus.key or _content_key(corpus.tokens)

    def doc_bytes():
        return (corpus.tokens[d.start : d.end].tobytes() for d in corpus.docs)

    def texts():
        return (piece for data in doc_bytes() for piece in text_pieces(data))

    tok = cached_bpe(cache_dir, key, vocab_size, texts)

    def build() -> tuple[bytes, list[Document]]:
        ids, counts = encode_documents(tok, doc_bytes())
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        docs = [Document(int(starts[i]), int(starts[i + 1]), d.group, d.name)
                for i, d in enumerate(corpus.docs)]  # fmt: skip
        return ids.tobytes(), docs

    tokens, docs = _cached(f"{key}.bpe{vocab_size}-{tok.sha256[:12]}", cache_dir, build, np.uint16)
    return Corpus(tokens=tokens, docs=docs, vocab_size=tok.vocab_size,
                  name=f"{corpus.name} (bpe {tok.vocab_size})", tokenizer=tok, key=key)  # fmt: skip


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
    tokenizer: str = "bytes",
    bpe_vocab: int | None = None,
) -> Corpus:
    """Load a corpus by source name: ``stdlib``, ``text`` or ``bin``; ``tokenizer``: ``bytes``,
    or ``bpe`` (a byte-level BPE of ``bpe_vocab`` tokens, text sources only)."""
    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose bytes or bpe")
    if source == "stdlib":
        corpus = stdlib_corpus(cache_dir)
    elif source == "text":
        assert path is not None
        corpus = text_corpus(path, cache_dir)
    elif source == "bin":
        assert path is not None
        if tokenizer != "bytes":
            raise ValueError("a .bin corpus holds token ids already; it takes no tokenizer")
        return bin_corpus(path, val_path, vocab_size=vocab_size or 50257)
    else:
        raise ValueError(f"unknown data source {source!r}; choose stdlib, text or bin")
    return bpe_corpus(corpus, cache_dir, bpe_vocab) if tokenizer == "bpe" else corpus
