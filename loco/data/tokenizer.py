"""The tokenizer of a corpus: bytes (vocabulary 256, the default) or a byte-level BPE.

Both work on the bytes of UTF-8 text. A token stands for a fixed byte string (one byte, or a
BPE merge of several), so any token sequence decodes to bytes and ``token_bytes`` says how
many bytes each token id stands for (what bits per byte divides by).

A BPE is trained with the ``tokenizers`` library (ByteLevel pre-tokenizer and decoder, the 256
bytes as its initial alphabet, so every text encodes) once per corpus and vocabulary size, and
cached as ``<cache>/<key>.bpe<V>.json``. That file, the copy in a run directory
(:data:`RUN_FILE`) and the copy in an exported model all hold the loco format: the vocabulary
(token strings in GPT-2's byte-to-character alphabet, in id order), the merges in rank order
and a SHA-256 of both. :func:`from_json` checks every field before it builds anything, so a
corrupt or hostile file is a :class:`TokenizerError` (a cache that fails is trained again).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loco.fsutil import atomic_write

log = logging.getLogger(__name__)

FORMAT = "loco-tokenizer"
VERSION = 1
KINDS = ("bytes", "bpe")
RUN_FILE = "tokenizer.loco.json"  # the run's tokenizer, in its run directory
MAX_FILE_BYTES = 64 << 20  # a tokenizer file larger than this is refused unread
MAX_VOCAB = 65536  # token ids are stored as uint16
MIN_BPE_VOCAB = 257  # the 256 bytes and at least one merge
DEFAULT_BPE_VOCAB = 8192
_BATCH_CHARS = 4 << 20  # characters encoded per call into the tokenizers library


class TokenizerError(ValueError):
    """A tokenizer file or request that cannot be used; ``str()`` is one line."""


def byte_alphabet() -> list[str]:
    """The character that stands for byte ``b`` at index ``b`` (GPT-2's byte-level alphabet:
    printable Latin-1 bytes are themselves, the others are shifted past U+00FF in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


_ALPHABET = byte_alphabet()
_CHAR_BYTE = {c: b for b, c in enumerate(_ALPHABET)}


class Tokenizer:
    """A byte or byte-level BPE tokenizer over ``vocab`` (token strings in the byte alphabet,
    id order) and ``merges`` (BPE merges in rank order; none for bytes).

    ``encode`` of any ``str`` and ``decode_bytes`` round-trip its UTF-8 bytes exactly.
    """

    def __init__(self, kind: str, vocab: list[str], merges: list[tuple[str, str]]) -> None:
        self.kind, self.vocab, self.merges = kind, vocab, merges
        self._bytes = [bytes(_CHAR_BYTE[c] for c in tok) for tok in vocab]
        self.token_bytes = np.array([len(b) for b in self._bytes], dtype=np.int64)
        self._backend: Any = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def sha256(self) -> str:
        """SHA-256 of the vocabulary and merges (what tokens mean), hex."""
        body = json.dumps([self.kind, self.vocab, self.merges], ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()

    def byte_id(self, b: int) -> int:
        """The id of the token that stands for the single byte ``b``."""
        return b if self.kind == "bytes" else self._ids()[_ALPHABET[b]]

    def _ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.vocab)}

    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` with this vocabulary and merges (built once)."""
        if self._backend is None:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers

            tok = HFTokenizer(models.BPE(vocab=self._ids(), merges=list(self.merges)))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            self._backend = tok
        return self._backend

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (its UTF-8 bytes)."""
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return [int(i) for a in self.encode_many([text]) for i in a]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """The token ids of each text, as int64 arrays."""
        if self.kind == "bytes":
            return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in texts]
        encs = self.backend().encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encs]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes ``ids`` stand for; an id outside the vocabulary stands for none."""
        n = len(self._bytes)
        return b"".join(self._bytes[i] for i in map(int, ids) if 0 <= i < n)

    def decode(self, ids: Iterable[int]) -> str:
        """``decode_bytes`` as text, U+FFFD for bytes that are not UTF-8 (a cut sequence)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self, **info: Any) -> bytes:
        """The loco file format (``info``: extra fields, e.g. what it was trained on)."""
        doc = {"format": FORMAT, "version": VERSION, "kind": self.kind, **info,
               "sha256": self.sha256, "vocab": self.vocab,
               "merges": [list(m) for m in self.merges]}  # fmt: skip
        return json.dumps(doc, ensure_ascii=False).encode()

    def hf_json(self) -> str:
        """``tokenizer.json`` of the ``tokenizers`` library (what ``PreTrainedTokenizerFast``
        loads), with the same ids as this tokenizer."""
        return self.backend().to_str()


def byte_tokenizer() -> Tokenizer:
    """Byte tokens: id ``b`` is byte ``b``."""
    return Tokenizer("bytes", list(_ALPHABET), [])


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``texts`` (deterministic:
    the same texts give the same tokenizer). Fewer tokens when the texts allow no more merges."""
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(
            f"a BPE vocabulary of {vocab_size} tokens: it must be in {MIN_BPE_VOCAB}..{MAX_VOCAB}"
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    ids = model["vocab"]
    vocab = sorted(ids, key=ids.__getitem__)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _checked("bpe", vocab, merges, "the trained tokenizer")


def _checked(kind: str, vocab: Any, merges: Any, where: str) -> Tokenizer:
    """A BPE tokenizer from untrusted ``vocab`` and ``merges``; TokenizerError when any field
    is not what this module writes."""
    if not isinstance(vocab, list) or not MIN_BPE_VOCAB <= len(vocab) <= MAX_VOCAB:
        raise TokenizerError(f"{where}: the vocabulary must be a list of "
                             f"{MIN_BPE_VOCAB}..{MAX_VOCAB} tokens")  # fmt: skip
    if not all(isinstance(t, str) and t and set(t) <= _CHAR_BYTE.keys() for t in vocab):
        raise TokenizerError(f"{where}: a token is not a non-empty byte-alphabet string")
    ids = set(vocab)
    if len(ids) != len(vocab) or not ids >= set(_ALPHABET):
        raise TokenizerError(f"{where}: the vocabulary repeats a token or lacks a single byte")
    if not isinstance(merges, list) or len(merges) > len(vocab):
        raise TokenizerError(f"{where}: the merges must be a list, at most one per token")
    pairs = []
    for m in merges:
        ok = isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(s, str) for s in m)
        if not ok or m[0] not in ids or m[1] not in ids or m[0] + m[1] not in ids:
            raise TokenizerError(f"{where}: merge {str(m)[:80]} is not two tokens whose "
                                 "concatenation is a token")  # fmt: skip
        pairs.append((m[0], m[1]))
    return Tokenizer(kind, vocab, pairs)


def from_json(data: bytes, where: str = "tokenizer") -> Tokenizer:
    """A tokenizer from the loco file format, every field checked (TokenizerError if not)."""
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerError(f"{where}: {len(data):,} bytes, over the {MAX_FILE_BYTES:,} limit")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{where}: not JSON ({str(e)[:80]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TokenizerError(f'{where}: not a loco tokenizer (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION or doc.get("kind") not in KINDS:
        raise TokenizerError(f"{where}: version {str(doc.get('version'))[:20]} kind "
                             f"{str(doc.get('kind'))[:20]}; this loco reads version {VERSION}, "
                             f"kinds {', '.join(KINDS)}")  # fmt: skip
    if doc["kind"] == "bytes":
        return byte_tokenizer()
    tok = _checked("bpe", doc.get("vocab"), doc.get("merges"), where)
    if doc.get("sha256") != tok.sha256:
        raise TokenizerError(f"{where}: its checksum does not match its contents (corrupt)")
    return tok


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TokenizerError(f"{path}: {size:,} bytes, over the {MAX_FILE_BYTES:,} limit")
        return path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror or e}") from None


def load(path: str | Path) -> Tokenizer:
    """The tokenizer in file ``path`` (see :func:`from_json`)."""
    return from_json(_read(Path(path)), str(path))


def save_run_copy(tok: Tokenizer | None, run_dir: Path) -> None:
    """Copy a BPE ``tok`` into ``run_dir`` (:data:`RUN_FILE`), where export and sample find
    it; byte tokens need no file."""
    if tok is not None and tok.kind != "bytes":
        atomic_write(Path(run_dir) / RUN_FILE, tok.to_json())


def cached_bpe(cache_dir: Path, key: str, vocab_size: int,
               texts: Callable[[], Iterable[str]]) -> Tokenizer:  # fmt: skip
    """The BPE of corpus ``key`` with ``vocab_size``: from ``<cache_dir>/<key>.bpe<V>.json``
    when that file holds one trained for the same key and size, else trained on ``texts()``
    and cached (a corrupt or mismatched file is replaced, never used)."""
    path = Path(cache_dir) / f"{key}.bpe{vocab_size}.json"
    if path.exists():
        try:
            data = _read(path)
            tok = from_json(data, str(path))
            doc = json.loads(data)
            if doc.get("corpus") == key and doc.get("requested_vocab") == vocab_size:
                return tok
            raise TokenizerError(f"{path}: trained for another corpus or vocabulary size")
        except TokenizerError as e:
            log.warning("tokenizer cache unusable, training it again: %s", e)
    tok = train_bpe(texts(), vocab_size)
    atomic_write(path, tok.to_json(corpus=key, requested_vocab=vocab_size))
    return tok


def text_pieces(data: bytes, limit: int = 1 << 20) -> Iterator[str]:
    """``data`` as text in pieces of at most about ``limit`` bytes, cut after a newline where
    one is near (never inside a UTF-8 sequence); bytes that are not UTF-8 become U+FFFD."""
    pos = 0
    while pos < len(data):
        end = min(len(data), pos + limit)
        if end < len(data):
            nl = data.rfind(b"\n", pos, end)
            if nl >= pos + limit // 2:
                end = nl + 1
            while end > pos + 1 and (data[end] & 0xC0) == 0x80:  # a UTF-8 continuation byte
                end -= 1
        yield data[pos:end].decode("utf-8", errors="replace")
        pos = end


def encode_documents(tok: Tokenizer, docs: Iterable[bytes]) -> tuple[np.ndarray, list[int]]:
    """All ``docs`` encoded one after another (uint16 ids) and the token count of each."""
    parts: list[np.ndarray] = []
    counts: list[int] = []
    batch: list[str] = []
    owner: list[int] = []  # the document of each piece in ``batch``

    def flush() -> None:
        for i, ids in zip(owner, tok.encode_many(batch), strict=True):
            counts[i] += len(ids)
            parts.append(ids.astype(np.uint16))
        batch.clear()
        owner.clear()

    chars = 0
    for i, data in enumerate(docs):
        counts.append(0)
        for piece in text_pieces(data):
            batch.append(piece)
            owner.append(i)
            chars += len(piece)
            if chars >= _BATCH_CHARS:
                flush()
                chars = 0
    flush()
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), counts
