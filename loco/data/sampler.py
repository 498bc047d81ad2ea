"""Train/validation split, per-site shards, and batches as a pure function of the step.

A shard is a list of segments ``[start, end)`` of the corpus token array, read as one
virtual concatenation. A site's global batch at ``step`` holds ``G = batch_size * nproc *
grad_accum`` windows of ``seq_len + 1`` tokens whose start positions are drawn from a generator
seeded by ``(seed, site, step)``; rank ``r`` takes rows ``[(r*accum + k)*B, (r*accum + k + 1)*B)``
for micro-step ``k``. The batch therefore depends only on (seed, site, step) and the global batch
size, never on the rank count or on what ran before: a resumed run, or a run with another
``site.nproc`` and the same global batch, sees the same data.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from loco.data.corpus import Corpus

Segments = np.ndarray  # (k, 2) int64 [start, end)


def split_train_val(corpus: Corpus, val_fraction: float) -> tuple[Segments, np.ndarray, Segments]:
    """Hold out a validation split: whole documents (chosen by a hash of their name) when the
    corpus has several, else the last ``val_fraction`` of the tokens. A separate validation file
    (``corpus.val_tokens``) is used whole when present.

    Returns (train segments of ``corpus.tokens``, the validation token array, its segments).
    """
    n = len(corpus.tokens)
    if corpus.val_tokens is not None:
        return (
            np.array([[0, n]], np.int64),
            corpus.val_tokens,
            np.array([[0, len(corpus.val_tokens)]], np.int64),
        )
    if len(corpus.docs) > 1:
        cut = int(val_fraction * 10_000)
        is_val = [zlib.crc32(d.name.encode()) % 10_000 < cut for d in corpus.docs]
        train = [(d.start, d.end) for d, v in zip(corpus.docs, is_val, strict=True) if not v]
        val = [(d.start, d.end) for d, v in zip(corpus.docs, is_val, strict=True) if v]
        if train and val:
            return np.array(train, np.int64), corpus.tokens, np.array(val, np.int64)
    split = n - max(1, int(n * val_fraction))
    return np.array([[0, split]], np.int64), corpus.tokens, np.array([[split, n]], np.int64)


def shard_segments(
    corpus: Corpus,
    train: Segments,
    *,
    num_shards: int,
    shard: int,
    split: str = "iid",
    chunk_tokens: int = 16384,
) -> Segments:
    """The segments of shard ``shard`` of ``num_shards``; shards are disjoint and cover ``train``.

    ``iid``: the train segments are cut into chunks of at most ``chunk_tokens`` that are dealt to
    shards in a fixed pseudo-random order. ``noniid``: whole top-level packages (document groups)
    go to one shard each, largest first onto the shard with the fewest tokens (a package larger
    than ``1/num_shards`` of the data is split by its sub-packages); a corpus with a
    single document is cut into ``num_shards`` contiguous pieces instead.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"site.shard={shard} must be in [0, data.num_shards={num_shards})")
    if split == "iid":
        return _iid_shard(train, num_shards, shard, chunk_tokens)
    if split != "noniid":
        raise ValueError(f"data.split={split!r} is not allowed; choose iid or noniid")
    train_set = {(int(a), int(b)) for a, b in train}
    docs = [d for d in corpus.docs if (d.start, d.end) in train_set]
    size: dict[str, int] = {}
    for d in docs:
        size[d.group] = size.get(d.group, 0) + d.end - d.start
    fair = sum(size.values()) / num_shards
    groups: dict[str, list[tuple[int, int]]] = {}
    for d in docs:
        # a package larger than a shard's fair share is split by its sub-packages
        g = "/".join(d.name.split("/")[:2]) if size[d.group] > fair else d.group
        groups.setdefault(g, []).append((d.start, d.end))
    if len(groups) < num_shards:  # too few groups (e.g. one text file)
        return _contiguous_shard(train, num_shards, shard)
    loads = [0] * num_shards
    owner: dict[str, int] = {}
    for name, segs in sorted(groups.items(), key=lambda kv: (-sum(e - s for s, e in kv[1]), kv[0])):
        k = min(range(num_shards), key=lambda i: (loads[i], i))
        owner[name] = k
        loads[k] += sum(e - s for s, e in segs)
    mine = sorted(seg for name, segs in groups.items() if owner[name] == shard for seg in segs)
    return np.array(mine, np.int64)


def _iid_shard(train: Segments, num_shards: int, shard: int, chunk_tokens: int) -> Segments:
    """Chunks of at most ``chunk_tokens`` dealt to shards in a fixed pseudo-random order."""
    chunks = [
        (s, min(s + chunk_tokens, b)) for a, b in _merge(train) for s in range(a, b, chunk_tokens)
    ]
    if len(chunks) < num_shards:
        raise ValueError(
            f"{len(chunks)} chunks cannot fill {num_shards} shards; lower data.chunk_tokens={chunk_tokens}"
        )
    order = np.random.default_rng(0x10C0).permutation(len(chunks))
    mine = sorted(chunks[i] for j, i in enumerate(order) if j % num_shards == shard)
    return np.array(mine, np.int64)


def _contiguous_shard(train: Segments, num_shards: int, shard: int) -> Segments:
    """Shard ``shard`` of ``num_shards`` contiguous pieces of the train tokens."""
    total = int(sum(b - a for a, b in train))
    lo, hi = total * shard // num_shards, total * (shard + 1) // num_shards
    out, pos = [], 0
    for a, b in train:
        s, e = max(a, a + lo - pos), min(b, a + hi - pos)
        if s < e:
            out.append((s, e))
        pos += b - a
    return np.array(out, np.int64)


def _merge(segments: Segments) -> list[tuple[int, int]]:
    """Adjacent segments joined: ``[(0, 5), (5, 9), (12, 20)] -> [(0, 9), (12, 20)]``."""
    out: list[tuple[int, int]] = []
    for a, b in segments:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], int(b))
        else:
            out.append((int(a), int(b)))
    return out


class TokenSampler:
    """Windows of ``seq_len + 1`` tokens from a shard, as a pure function of (seed, key, index)."""

    def __init__(
        self, tokens: np.ndarray, segments: Segments, *, seq_len: int, seed: int, key: str
    ) -> None:
        segments = np.asarray(segments, np.int64).reshape(-1, 2)
        lengths = segments[:, 1] - segments[:, 0]
        self.tokens = tokens
        self.seg_start = segments[:, 0]
        self.cum = np.concatenate([[0], np.cumsum(lengths)])
        self.total = int(self.cum[-1])
        self.seq_len = seq_len
        self.seed = seed
        self.key = zlib.crc32(key.encode())
        if self.total < seq_len + 2:
            raise ValueError(
                f"the shard '{key}' holds {self.total} tokens, fewer than train.seq_len + 2 = "
                f"{seq_len + 2}; use a larger corpus, fewer shards or a shorter train.seq_len"
            )

    def starts(self, index: int, n: int) -> np.ndarray:
        """Virtual start positions of the ``n`` windows drawn for ``index`` (a step, an eval batch)."""
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.key, index]))
        )
        starts = rng.integers(0, self.total - self.seq_len - 1, size=n, endpoint=True)
        return starts

    def gather(self, starts: np.ndarray) -> torch.Tensor:
        pos = starts[:, None] + np.arange(self.seq_len + 1)
        seg = np.searchsorted(self.cum, pos, side="right") - 1
        phys = self.seg_start[seg] + (pos - self.cum[seg])
        return torch.from_numpy(self.tokens[phys].astype(np.int64))

    def batch(
        self, index: int, *, global_rows: int, rows: int, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[offset, offset + rows)`` of the global batch ``index``: inputs and targets."""
        assert 0 <= offset and offset + rows <= global_rows
        starts = self.starts(index, global_rows)[offset : offset + rows]
        w = self.gather(starts)
        return w[:, :-1], w[:, 1:]


class SiteData:
    """A site's training batches and the shared validation batches, for one rank."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        site: str,
        shard: int,
        num_shards: int,
        split: str,
        chunk_tokens: int,
        val_fraction: float,
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        train, val_tokens, val = split_train_val(corpus, val_fraction)
        segs = shard_segments(
            corpus,
            train,
            num_shards=num_shards,
            shard=shard,
            split=split,
            chunk_tokens=chunk_tokens,
        )
        self.train = TokenSampler(corpus.tokens, segs, seq_len=seq_len, seed=seed, key=site)
        self.val = TokenSampler(val_tokens, val, seq_len=seq_len, seed=seed, key="validation")
        self.shard_tokens = self.train.total
        self.B, self.accum, self.rank, self.world = batch_size, grad_accum, rank, world
        self.token_bytes = corpus.token_bytes

    @property
    def global_rows(self) -> int:
        return self.B * self.world * self.accum

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        off = (self.rank * self.accum + micro) * self.B
        return self.train.batch(step, global_rows=self.global_rows, rows=self.B, offset=off)

    def text_bytes(self, tokens: torch.Tensor) -> int:
        """The number of text bytes ``tokens`` stand for (what bits per byte divide by); 0 when
        the corpus's tokens stand for no known text (a .bin file of token ids)."""
        if self.token_bytes is None:
            return 0
        return int(self.token_bytes[tokens.cpu().numpy()].sum())

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.val.batch(
            i, global_rows=self.B * self.world, rows=self.B, offset=self.rank * self.B
        )
