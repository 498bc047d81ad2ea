"""Lattice phi frames: every header field is bounded before anything is allocated."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from loco.compress import PayloadError
from loco.outer import bitpack, lattice
from tests.hostile.rss import peak_growth_mib


def _frame(n: int, block: int, nb: int | None = None, version: int = lattice.VERSION,
           bits: int = 8) -> bytes:  # fmt: skip
    """A frame with a valid CRC: steps 1.0 (bf16 0x3F80), codes 0 and hashes that match a zero
    phi."""
    nb = -(-n // block) if nb is None else nb
    body = b"".join((
        lattice._HEAD.pack(lattice.MAGIC, version, bits, 0, n, block, nb),
        np.full(nb, 0x3F80, "<u2").tobytes(), np.zeros(nb, "<u4").tobytes(),
        bytes((n * bits + 7) // 8),
    ))  # fmt: skip
    return body + struct.pack("<I", zlib.crc32(body))


class _Forbidden:
    """Stands in for numpy / torch inside ``lattice``: any use means something was allocated."""

    def __getattr__(self, name: str):  # noqa: ANN204
        raise AssertionError(f"lattice.decode reached {name} before refusing the frame")


def test_1kb_frame_with_block_2_26_is_refused_in_bounded_memory():
    setup = """
import torch
from loco.compress import PayloadError
from loco.outer import lattice
from tests.outer.test_lattice_bounds import _frame
buf, ref = _frame(1000, 1 << 26), torch.zeros(1000)
"""
    code = """
try:
    __out = ["decoded", lattice.decode(buf, ref).values.numel(), len(buf)]
except PayloadError as e:
    __out = ["refused", str(e), len(buf)]
"""
    grew, (what, detail, nbytes) = peak_growth_mib(setup, code)
    assert nbytes < 1100
    assert what == "refused" and "block" in detail, detail
    assert grew < 50, f"peak RSS grew by {grew:.0f} MiB"


@pytest.mark.parametrize(
    "buf,match",
    [(_frame(1000, 0, nb=1), "block 0"), (_frame(1000, lattice.MAX_BLOCK + 1), "block"),
     (_frame(1000, 1 << 26), "block"), (_frame(1000, 256, version=1), "version"),
     (_frame(1000, 256, bits=1), "bits"), (_frame(1000, 256, bits=9), "bits"),
     (_frame(1000, 256, bits=0), "blocks"), (_frame(1000, 256, bits=3)[:-1], "bytes"),
     (_frame(1000, 256, nb=3), "blocks 3"), (_frame(999, 256), "reference"),
     (_frame(1000, 256)[:-1], "bytes"), (_frame(1000, 256) + b"\0", "bytes")],
)  # fmt: skip
def test_bad_headers_are_refused_before_any_allocation(monkeypatch, buf, match):
    ref = torch.zeros(1000)
    monkeypatch.setattr(lattice, "np", _Forbidden())
    monkeypatch.setattr(lattice, "torch", _Forbidden())
    with pytest.raises(PayloadError, match=match):
        lattice.decode(buf, ref)


def test_max_numel_is_checked_before_any_allocation(monkeypatch):
    buf = _frame(1000, 256)
    monkeypatch.setattr(lattice, "np", _Forbidden())
    with pytest.raises(PayloadError, match="max_numel"):
        lattice.decode(buf, torch.zeros(1000), max_numel=999)


def test_frame_numel_checks_version_and_length():
    assert lattice.frame_numel(_frame(1000, 256)) == 1000
    with pytest.raises(PayloadError, match="version"):
        lattice.frame_numel(_frame(1000, 256, version=1))
    with pytest.raises(PayloadError, match="block"):
        lattice.frame_numel(_frame(1000, 1 << 26))
    claims_2_40 = _frame(1000, 256)[:8] + struct.pack("<Q", 1 << 40) + _frame(1000, 256)[16:]
    with pytest.raises(PayloadError):
        lattice.frame_numel(claims_2_40)  # a header may not claim more values than it carries
    with pytest.raises(PayloadError):
        lattice.frame_numel(object())


@pytest.mark.parametrize("block,n", [(256, 3001), (lattice.MAX_BLOCK, 2 * lattice.MAX_BLOCK + 17)])
def test_honest_frames_decode_bit_identically_to_the_senders_values(block, n):
    g = torch.Generator().manual_seed(block)
    phi, m = torch.randn(n, generator=g) * 0.05, torch.randn(n, generator=g) * 1e-3
    buf, own = lattice.encode(phi, m, block=block)
    assert lattice.frame_numel(buf) == n
    ref = phi + 1e-4 * torch.randn(n, generator=g)
    got = lattice.decode(buf, ref, max_numel=n)
    assert got.failed == 0 and got.blocks == -(-n // block)
    v = got.values
    assert v.dtype == own.dtype and torch.equal(v.view(torch.int32), own.view(torch.int32))
    with pytest.raises(PayloadError, match="max_numel"):
        lattice.decode(buf, ref, max_numel=n - 1)


def test_encoder_refuses_a_block_the_decoder_would_refuse():
    with pytest.raises(ValueError, match="block"):
        lattice.encode(torch.zeros(10), torch.zeros(10), block=lattice.MAX_BLOCK + 1)
    with pytest.raises(ValueError, match="block"):
        lattice.encode(torch.zeros(10), torch.zeros(10), block=0)


def test_codes_with_padding_bits_set_are_refused():
    phi = torch.linspace(-0.1, 0.1, 13)
    steps = torch.full((1,), 0.01)
    buf = bytearray(lattice.encode(phi, torch.zeros(13), bits=3, steps=steps)[0])
    assert (13 * 3) % 8  # the last code byte has unused bits
    buf[-5] |= 1  # the last code byte, before the CRC
    body = bytes(buf[:-4])
    buf[-4:] = struct.pack("<I", zlib.crc32(body))
    with pytest.raises(PayloadError, match="unused bits"):
        lattice.decode(bytes(buf), phi)


def _bit_planes(codes: np.ndarray, bits: int) -> bytes:
    """The frame's code layout by definition: each code's ``bits`` bits, MSB first, one
    after another, packed into bytes MSB first, the last byte's unused bits zero."""
    planes = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1)).tobytes()


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_pack_as_one_msb_first_bit_string(bits):
    """The word-wise packer writes exactly the bit string of the frame's definition, and the
    unpacker reads it back, at every length modulo 8 codes."""
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 13, 255, 256, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=gen)
        packed = bitpack.pack(codes, bits)
        assert packed == _bit_planes(codes.numpy(), bits)
        assert torch.equal(bitpack.unpack(memoryview(packed), 0, n, bits), codes)


def test_steps_that_are_not_finite_and_positive_are_refused():
    frame = bytearray(_frame(1000, 256))
    head = lattice._HEAD.size
    for bad in (0x0000, 0xBF80, 0x7F80, 0x7FC0):  # 0, -1, inf, nan
        frame[head : head + 2] = struct.pack("<H", bad)
        frame[-4:] = struct.pack("<I", zlib.crc32(bytes(frame[:-4])))
        with pytest.raises(PayloadError, match="steps"):
            lattice.decode(bytes(frame), torch.zeros(1000))
