"""Corpus, shards and batches: deterministic, disjoint, independent of the rank count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loco.data import SiteData, shard_segments, split_train_val, stdlib_corpus
from loco.data.corpus import bin_corpus, stdlib_files, text_corpus


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_stdlib_corpus_is_the_sorted_source_files(corpus):
    root, files = stdlib_files()
    assert len(corpus.docs) == len(files)
    assert [d.name for d in corpus.docs] == sorted(d.name for d in corpus.docs)
    first = corpus.docs[0]
    assert bytes(corpus.tokens[first.start : first.end]).startswith(files[0].read_bytes())
    assert corpus.docs[-1].end == len(corpus.tokens) and corpus.vocab_size == 256
    # cached: a second load maps the same file
    again = stdlib_corpus()
    assert again.tokens.filename == corpus.tokens.filename


def test_validation_split_is_held_out(corpus):
    train, val_tokens, val = split_train_val(corpus, 0.05)
    assert val_tokens is corpus.tokens
    tr = {(int(a), int(b)) for a, b in train}
    va = {(int(a), int(b)) for a, b in val}
    assert not tr & va and len(tr) + len(va) == len(corpus.docs)
    frac = sum(b - a for a, b in va) / len(corpus.tokens)
    assert 0.02 < frac < 0.1, frac


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_shards_are_disjoint_and_cover_the_train_split(corpus, split):
    train, _, _ = split_train_val(corpus, 0.05)
    mask = np.zeros(len(corpus.tokens), dtype=np.int8)
    for a, b in train:
        mask[a:b] = 1
    sizes = []
    for s in range(3):
        segs = shard_segments(corpus, train, num_shards=3, shard=s, split=split, chunk_tokens=16384)
        for a, b in segs:
            assert (mask[a:b] == 1).all(), "a shard overlaps another shard or the validation split"
            mask[a:b] = 2
        sizes.append(int((segs[:, 1] - segs[:, 0]).sum()))
    assert not (mask == 1).any(), "some training tokens belong to no shard"
    assert max(sizes) < 1.2 * min(sizes), sizes


def test_noniid_shards_hold_different_packages(corpus):
    train, _, _ = split_train_val(corpus, 0.05)
    groups = []
    for s in range(3):
        segs = {
            (int(a), int(b))
            for a, b in shard_segments(corpus, train, num_shards=3, shard=s, split="noniid")
        }
        groups.append(
            {
                d.name.split("/")[0]
                for d in corpus.docs
                if (d.start, d.end) in segs and "/" in d.name and not d.name.startswith("test/")
            }
        )
    assert not groups[0] & groups[1] and not groups[1] & groups[2] and not groups[0] & groups[2]


def site_data(corpus, rank=0, world=1, batch=4, accum=1, site="eu", seed=3):
    return SiteData(
        corpus,
        site=site,
        shard=0,
        num_shards=3,
        split="iid",
        chunk_tokens=16384,
        val_fraction=0.05,
        seq_len=32,
        batch_size=batch,
        grad_accum=accum,
        rank=rank,
        world=world,
        seed=seed,
    )


def test_batches_are_a_pure_function_of_seed_site_step(corpus):
    a, b = site_data(corpus), site_data(corpus)
    xa, ya = a.train_batch(7, 0)
    b.train_batch(3, 0)  # history does not matter
    xb, yb = b.train_batch(7, 0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the next tokens
    assert not torch.equal(a.train_batch(8, 0)[0], xa)
    assert not torch.equal(site_data(corpus, site="us").train_batch(7, 0)[0], xa)
    assert not torch.equal(site_data(corpus, seed=4).train_batch(7, 0)[0], xa)


def test_global_batch_does_not_depend_on_rank_count(corpus):
    whole = site_data(corpus, batch=12).train_batch(5, 0)[0]
    for world, accum in ((2, 1), (3, 1), (2, 3), (1, 3)):
        b = 12 // (world * accum)
        parts = [
            site_data(corpus, rank=r, world=world, batch=b, accum=accum).train_batch(5, k)[0]
            for r in range(world)
            for k in range(accum)
        ]
        assert torch.equal(torch.cat(parts), whole), (world, accum)
    val = site_data(corpus, batch=6).val_batch(2)[0]
    assert torch.equal(
        torch.cat([site_data(corpus, rank=r, world=2, batch=3).val_batch(2)[0] for r in range(2)]),
        val,
    )


def test_text_and_bin_sources(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("hello world, this is a tiny corpus. " * 200)
    c = text_corpus(txt)
    d = SiteData(
        c,
        site="eu",
        shard=1,
        num_shards=3,
        split="iid",
        chunk_tokens=256,
        val_fraction=0.1,
        seq_len=16,
        batch_size=2,
        grad_accum=1,
        rank=0,
        world=1,
        seed=0,
    )
    x, _ = d.train_batch(0, 0)
    assert x.shape == (2, 16) and bytes(x[0].tolist()).decode() in txt.read_text() * 2
    ids = np.arange(5000, dtype=np.uint16) % 50000
    ids.tofile(tmp_path / "train.bin")
    ids[:600].tofile(tmp_path / "val.bin")
    b = bin_corpus(tmp_path / "train.bin", tmp_path / "val.bin")
    assert b.vocab_size == 50257 and not b.tokens_are_bytes
    d = SiteData(
        b,
        site="eu",
        shard=0,
        num_shards=2,
        split="noniid",
        chunk_tokens=256,
        val_fraction=0.1,
        seq_len=8,
        batch_size=2,
        grad_accum=1,
        rank=0,
        world=1,
        seed=0,
    )
    x, y = d.train_batch(0, 0)
    assert torch.equal((x + 1) % 50000, y)  # consecutive ids: windows are contiguous
    assert int(d.val_batch(0)[0].max()) < 600


def test_bad_data_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        text_corpus(tmp_path / "missing.txt")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="even size"):
        bin_corpus(tmp_path / "odd.bin")
    small = tmp_path / "small.txt"
    small.write_text("abc" * 10)
    with pytest.raises(ValueError, match="fewer than train.seq_len"):
        SiteData(
            text_corpus(small),
            site="eu",
            shard=0,
            num_shards=1,
            split="iid",
            chunk_tokens=8,
            val_fraction=0.1,
            seq_len=64,
            batch_size=1,
            grad_accum=1,
            rank=0,
            world=1,
            seed=0,
        )
