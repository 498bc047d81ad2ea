"""Hostile decoder fuzz of sparse frames: every mutation of a header or payload is a
PayloadError or a decode of the header's size (bounded by the frame's length), never another
exception; the kernels' validation equals the reference's, status for status."""

from __future__ import annotations

import random

import pytest
import torch

import loco.compress as lc
from loco.compress import PayloadError, decode, decode_accumulate, encode
from loco.compress import reference as ref
from loco.compress.wire import HEADER, HEADER_SIZE, MAX_VALUES_PER_BYTE

from .helpers import ext_or_skip, op_args
from .test_wire import _mutate, _resign

OPTS = [
    {},
    {"block": 64, "k": 5, "bits": 1},
    {"block": 100, "k": 9, "bits": 3, "scale_dtype": "fp16"},
    {"block": 256, "k": 256, "bits": 4},
    {"block": 32, "k": 7, "rounding": "stochastic"},
]


def _frames() -> list[bytes]:
    g = torch.Generator().manual_seed(4)
    return [encode(torch.randn(n, generator=g) * 10, "sparse", **o)
            for o in OPTS for n in (1, 7, 130, 513, 4097)]  # fmt: skip


def _sparse_mutation(rng: random.Random, buf: bytes) -> bytes:
    """Mutations aimed at the sparse fields, checksums fixed so the content checks run."""
    b = bytearray(buf)
    op = rng.randrange(4)
    if op == 0:  # the k field: k, bits (upper byte) or both
        fields = list(HEADER.unpack_from(b, 0))
        k, bits = fields[7] & 0xFFFFFF, fields[7] >> 24
        k = rng.choice([k, 0, 1, k + 1, k - 1, 65536, 0xFFFFFF, rng.randrange(1 << 24)])
        bits = rng.choice([bits, 0, 1, 2, 3, 4, 5, 255])
        fields[7] = (max(k, 0) & 0xFFFFFF) | bits << 24
        return _resign(HEADER.pack(*fields) + bytes(b[HEADER_SIZE:]))
    if op == 1:  # block (chunk) field
        fields = list(HEADER.unpack_from(b, 0))
        fields[6] = rng.choice([1, 2, fields[6] // 2, fields[6] * 2, 65536, 65537, 1 << 31])
        return _resign(HEADER.pack(*fields) + bytes(b[HEADER_SIZE:]))
    if op == 2 and len(b) > HEADER_SIZE:  # single bit flips in the records
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(HEADER_SIZE, len(b))] ^= 1 << rng.randrange(8)
        return _resign(b)
    return _mutate(rng, buf)  # the generic ones: truncation, extension, random fields and bytes


@pytest.mark.parametrize("rounds", [3000])
def test_sparse_decoder_fuzz(backend, rounds):
    rng = random.Random(77)
    frames = _frames()
    outcomes = {"ok": 0, "PayloadError": 0}
    for _ in range(rounds):
        buf = _sparse_mutation(rng, rng.choice(frames))
        try:
            y = decode(buf)  # the default bound: at most 1024 values per received byte
        except PayloadError:
            outcomes["PayloadError"] += 1
            continue
        assert y.numel() == HEADER.unpack_from(buf, 0)[5] <= MAX_VALUES_PER_BYTE * len(buf)
        assert bool(torch.isfinite(y).all())
        out = torch.zeros(y.numel())
        decode_accumulate(buf, out)
        if y.dtype == torch.float32:
            assert torch.equal(out, y)
        outcomes["ok"] += 1
    assert outcomes["PayloadError"] > rounds // 2 and outcomes["ok"] > rounds // 50, outcomes


@pytest.mark.slow
def test_sparse_decoder_fuzz_long(backend):
    test_sparse_decoder_fuzz(backend, 50_000)


def test_kernel_validation_equals_reference_on_corrupted_payloads():
    """Random byte changes in sparse payloads (several errors at once included): the same status
    from the kernel and the reference (precedence: scale, padding, index), and on status 0 the
    same decoded bits; on any error ``out`` is untouched."""
    ops = ext_or_skip()
    rng = random.Random(5)
    g = torch.Generator().manual_seed(6)
    statuses = set()
    for opts in OPTS:
        codec = lc.make_codec("sparse", **opts)
        for n in (7, 513, 4097):
            good = torch.empty(codec.payload_nbytes(n), dtype=torch.uint8)
            assert ref.quantize(torch.randn(n, generator=g), None, good, *op_args(codec), 3) == 0
            for _ in range(60):
                p = good.clone()
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(p.numel())
                    p[i] = rng.choice([0x00, 0xFF, 0x80, 0x7F, int(p[i]) ^ (1 << rng.randrange(8))])
                base = torch.randn(n, generator=g)
                o_ext, o_ref = base.clone(), base.clone()
                s_ext = ops.dequantize(p, o_ext, *op_args(codec), True)
                s_ref = ref.dequantize(p, o_ref, *op_args(codec), True)
                assert s_ext == s_ref, (opts, n)
                statuses.add(s_ref)
                assert torch.equal(o_ext.view(torch.int32), o_ref.view(torch.int32))
                if s_ref:
                    assert torch.equal(o_ext, base)
    assert {ref.OK, ref.BAD_SCALE, ref.BAD_PADDING, ref.BAD_INDEX} <= statuses, statuses
