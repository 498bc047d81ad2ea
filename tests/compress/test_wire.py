"""The wire format: header checks, crafted bad payloads, and a decoder fuzz test."""

from __future__ import annotations

import random
import struct

import pytest
import torch

import loco.compress as lc
from loco.compress import PayloadError, decode, decode_accumulate, encode
from loco.compress.wire import HEADER, HEADER_SIZE

from .helpers import CONFIGS


def _resign(buf: bytes | bytearray, fix_payload_crc: bool = True) -> bytes:
    """Recompute the checksums after a deliberate change (to reach the content checks)."""
    b = bytearray(buf)
    fields = list(HEADER.unpack_from(b, 0))
    if fix_payload_crc:
        fields[9] = lc.crc32c(bytes(b[HEADER_SIZE:]))
    head = HEADER.pack(*fields[:10], 0)[:36]
    b[:HEADER_SIZE] = head + struct.pack("<I", lc.crc32c(head))
    return bytes(b)


def _set_field(buf: bytes, index: int, value: int) -> bytes:
    fields = list(HEADER.unpack_from(buf, 0))
    fields[index] = value
    return _resign(HEADER.pack(*fields) + buf[HEADER_SIZE:])


def _expect_payload_error(buf: bytes, match: str | None = None) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(buf)
    numel = 0
    if len(buf) >= HEADER_SIZE:
        numel = HEADER.unpack_from(buf, 0)[5]
    out = torch.zeros(min(numel, 1 << 20))
    before = out.clone()
    with pytest.raises(PayloadError):
        decode_accumulate(buf, out)
    assert torch.equal(out, before)


def test_header_layout():
    x = torch.randn(1000)
    buf = encode(x, "int8", block=256)
    magic, ver, codec, dtype, flags, numel, block, k, plen, pcrc, hcrc = HEADER.unpack_from(buf, 0)
    assert (magic, ver, codec, dtype, flags) == (b"LOCO", 1, 2, 0, 0)
    assert (numel, block, k, plen) == (1000, 256, 0, 4 * 4 + 1000)
    assert pcrc == lc.crc32c(buf[HEADER_SIZE:])
    assert hcrc == lc.crc32c(buf[:36])
    assert HEADER_SIZE == 40 and len(buf) == 40 + plen
    # fp16 scales and stochastic rounding are flags
    buf = encode(x, "int4", rounding="stochastic")
    assert HEADER.unpack_from(buf, 0)[4] == 3


def test_checks_every_header_field(backend):
    good = encode(torch.randn(300), "topk", block=64, k=4)
    _expect_payload_error(good[:10], "truncated")
    _expect_payload_error(good[:-1], "truncated")
    _expect_payload_error(good + b"\0", "oversized")
    _expect_payload_error(b"XXXX" + good[4:], "magic")
    _expect_payload_error(_set_field(good, 1, 2), "version")
    _expect_payload_error(_set_field(good, 2, 9), "codec")
    _expect_payload_error(_set_field(good, 3, 7), "dtype")
    _expect_payload_error(_set_field(good, 4, 4), "flag")
    _expect_payload_error(_set_field(good, 5, 400), "payload_len")
    _expect_payload_error(_set_field(good, 5, 1 << 60), "numel")
    _expect_payload_error(_set_field(good, 6, 0), "block")
    _expect_payload_error(_set_field(good, 7, 65), "k=")
    _expect_payload_error(_set_field(good, 8, 5), "payload_len")
    bad_hcrc = bytearray(good)
    bad_hcrc[36] ^= 1
    _expect_payload_error(bytes(bad_hcrc), "header checksum")
    bad_pcrc = bytearray(good)
    bad_pcrc[-1] ^= 0x10
    _expect_payload_error(bytes(bad_pcrc), "payload checksum")
    with pytest.raises(PayloadError, match="max_numel"):
        decode(good, max_numel=299)
    for junk in (None, 3, "LOCO", object()):
        with pytest.raises(PayloadError):
            decode(junk)  # type: ignore[arg-type]
    _expect_payload_error(_set_field(encode(torch.randn(8), "int8"), 7, 1), "k field")
    _expect_payload_error(_set_field(encode(torch.randn(8), "bf16"), 6, 4), "must be 0")
    _expect_payload_error(_set_field(encode(torch.randn(8), "int4"), 6, 3), "even")


@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scale_rejected(backend, scale_dtype, bad):
    buf = bytearray(encode(torch.randn(100), "int8", block=32, scale_dtype=scale_dtype))
    if scale_dtype == "fp32":
        buf[HEADER_SIZE + 4 : HEADER_SIZE + 8] = struct.pack("<f", bad)
    else:
        buf[HEADER_SIZE + 2 : HEADER_SIZE + 4] = struct.pack("<e", bad)
    _expect_payload_error(_resign(buf), "scale")


def test_bad_content_rejected(backend):
    # top-k indices: repeated, decreasing, out of the (partial last) block
    buf = bytearray(encode(torch.randn(70), "topk", block=32, k=4))  # blocks of 32, 32, 6
    idx0 = HEADER_SIZE + 3 * 4  # after 3 fp32 scales; block b's indices at idx0 + 4 b
    repeated = bytearray(buf)
    repeated[idx0 + 1] = repeated[idx0]
    decreasing = bytearray(buf)
    decreasing[idx0], decreasing[idx0 + 1] = buf[idx0 + 1], buf[idx0]
    outside = bytearray(buf)
    outside[idx0 + 3] = 32  # block 0 has 32 values: 0..31
    outside_last = bytearray(buf)
    outside_last[idx0 + 8 + 3] = 6  # the last block has 6 values: 0..5
    for b in (repeated, decreasing, outside, outside_last):
        _expect_payload_error(_resign(b), "indices")
    # 4-bit padding nibble of an odd-length payload
    for name in ("int4", "fp4"):
        b = bytearray(encode(torch.randn(5), name))
        b[-1] |= 0x01
        _expect_payload_error(_resign(b), "nibble")
    # non-finite values in none / bf16 payloads
    b = bytearray(encode(torch.randn(5), "none"))
    b[HEADER_SIZE : HEADER_SIZE + 4] = struct.pack("<f", float("nan"))
    _expect_payload_error(_resign(b), "NaN or Inf")
    b = bytearray(encode(torch.randn(5), "bf16"))
    b[HEADER_SIZE : HEADER_SIZE + 2] = b"\x80\x7f"  # bf16 +Inf
    _expect_payload_error(_resign(b), "NaN or Inf")


def _valid_frames() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    frames = []
    for name, opts in CONFIGS:
        for n in (0, 1, 7, 130, 513):
            frames.append(encode(torch.randn(n, generator=g), name, **opts))
    return frames


def _mutate(rng: random.Random, buf: bytes) -> bytes:
    op = rng.randrange(7)
    b = bytearray(buf)
    if op == 0:  # truncate
        return bytes(b[: rng.randrange(len(b) + 1)])
    if op == 1:  # extend
        return bytes(b + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))))
    if op == 2:  # flip bits anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 3:  # random bytes
        n = rng.choice([0, 1, 39, 40, 41, rng.randrange(2000)])
        return bytes(rng.randrange(256) for _ in range(n))
    if op == 4:  # random header field, checksums fixed: reaches the consistency checks
        fields = list(HEADER.unpack_from(b, 0))
        i = rng.randrange(1, 9)
        fields[i] = rng.choice([0, 1, 2, 3, 5, 255, 2**16, 2**31 - 1, rng.randrange(2**32)])
        if i in (1, 2, 3, 4):
            fields[i] &= 0xFF
        return _resign(HEADER.pack(*fields) + bytes(b[HEADER_SIZE:]))
    if op == 5 and len(b) > HEADER_SIZE:  # payload bytes changed, checksum fixed: content checks
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(HEADER_SIZE, len(b))
            b[i] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x7C, rng.randrange(256)])
        return _resign(b)
    # header kept, payload replaced by random bytes of the right length, checksums fixed
    b[HEADER_SIZE:] = bytes(rng.randrange(256) for _ in range(len(b) - HEADER_SIZE))
    return _resign(b)


@pytest.mark.parametrize("rounds", [5000])
def test_decoder_fuzz_only_payload_error(backend, rounds):
    rng = random.Random(1234)
    frames = _valid_frames()
    outcomes = {"ok": 0, "PayloadError": 0}
    for _ in range(rounds):
        buf = _mutate(rng, rng.choice(frames))
        try:
            y = decode(buf, max_numel=1 << 22)
            assert torch.isfinite(y).all()
            out = torch.zeros(y.numel())
            decode_accumulate(buf, out)
            if y.dtype == torch.float32:  # fp16/bf16 headers: decode() rounds, accumulate not
                assert torch.equal(out, y)
            outcomes["ok"] += 1
        except PayloadError:
            outcomes["PayloadError"] += 1
    # both outcomes occur; any other exception fails the test above
    assert outcomes["PayloadError"] > rounds // 2 and outcomes["ok"] > 0, outcomes


@pytest.mark.slow
def test_decoder_fuzz_long(backend):
    test_decoder_fuzz_only_payload_error(backend, 100_000)


def test_encode_frame_tensor_matches_bytes():
    x = torch.randn(1000)
    t = lc.encode_frame(x, "int4", seed=5)
    assert t.dtype == torch.uint8 and bytes(t.numpy()) == encode(x, "int4", seed=5)
    ef1 = lc.ErrorFeedback("int8", 1000)
    ef2 = lc.ErrorFeedback("int8", 1000)
    assert bytes(ef1.encode_frame(x).numpy()) == ef2.encode(x)
