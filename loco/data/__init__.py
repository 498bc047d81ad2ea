"""Corpora, their tokenizers (bytes or a byte-level BPE), per-site shards and batches."""

from loco.data.corpus import Corpus, load_corpus, stdlib_corpus
from loco.data.sampler import SiteData, TokenSampler, shard_segments, split_train_val

__all__ = [
    "Corpus",
    "SiteData",
    "TokenSampler",
    "load_corpus",
    "shard_segments",
    "split_train_val",
    "stdlib_corpus",
]
