"""``decode`` is bounded by default: a frame cannot make the receiver allocate much more than
``MAX_VALUES_PER_BYTE`` values per received byte, and honest frames always fit that bound."""

from __future__ import annotations

import pytest
import torch

import loco.compress as lc
from loco.compress import PayloadError, decode, decode_accumulate, encode
from loco.compress.reference import payload_nbytes
from loco.compress.wire import HEADER_SIZE, MAX_VALUES_PER_BYTE, Header
from loco.outer.exchange import codec_options
from tests.hostile.rss import peak_growth_mib

TOPK, SPARSE, FP16 = 5, 6, 1
SPARSE_BITS = 1 << 24  # the k field of a sparse frame: k | bits << 24


def _frame(codec_id: int, numel: int, block: int, k: int = 0, flags: int = 0,
           payload: bytes | None = None) -> bytes:  # fmt: skip
    """A frame with valid checksums and a payload_len consistent with its fields (zeros)."""
    if payload is None:
        payload = bytes(payload_nbytes(numel, codec_id, block, k, bool(flags & FP16)))
    head = Header(codec_id, 0, flags, numel, block, k, len(payload), lc.crc32c(payload))
    return head.pack(lc.crc32c) + payload


_BOMB = """
import torch
from loco.compress import PayloadError, crc32c, decode
from loco.compress.wire import Header
nb, block = 1000, 65536  # top-k, k=1, fp16 scales: 5 payload bytes per 65536 values
payload = (b"\\x00\\x3c" * nb) + bytes(2 * nb) + b"\\x01" * nb  # scale 1.0, index 0, value 1
buf = Header(5, 0, 1, nb * block, block, 1, len(payload), crc32c(payload)).pack(crc32c) + payload
"""


_SPARSE_BOMB = """
import torch
from loco.compress import PayloadError, crc32c, decode
from loco.compress.wire import Header
nb, block = 1000, 65536  # sparse, k=1, 1 bit, fp16 scales: 7 payload bytes per 65536 values
payload = (b"\\x00\\x3c\\x00\\x3c" + b"\\x00\\x00" + b"\\x00") * nb
buf = Header(6, 0, 1, nb * block, block, 1 | 1 << 24, len(payload), crc32c(payload)).pack(
    crc32c) + payload
"""


@pytest.mark.parametrize("bomb", [_BOMB, _SPARSE_BOMB], ids=["topk", "sparse"])
def test_tiny_frame_claiming_65m_values_is_refused_by_default_in_bounded_memory(bomb):
    code = """
try:
    y = decode(buf)
    __out = ["decoded", y.numel(), len(buf)]
except PayloadError as e:
    __out = ["refused", str(e), len(buf)]
"""
    grew, (what, detail, nbytes) = peak_growth_mib(bomb, code)
    assert nbytes < 7100
    assert what == "refused", f"a {nbytes}-byte frame decoded to {detail} values"
    assert grew < 50, f"peak RSS grew by {grew:.0f} MiB"


def test_the_same_frame_is_refused_even_with_a_generous_explicit_bound():
    nb, block = 1000, 65536
    buf = _frame(TOPK, nb * block, block, k=1, flags=FP16)
    with pytest.raises(PayloadError, match="values per byte"):
        decode(buf, max_numel=1 << 40)  # the codec's own rule: no honest sender makes it
    out = torch.zeros(10)
    with pytest.raises(PayloadError, match="max_numel"):
        decode_accumulate(buf, out)  # bounded by out.numel() before the payload is read
    assert torch.equal(out, torch.zeros(10))
    buf = _frame(SPARSE, nb * block, block, k=1 | SPARSE_BITS, flags=FP16)
    with pytest.raises(PayloadError, match="values per byte"):
        decode(buf, max_numel=1 << 40)


@pytest.mark.parametrize(
    "codec_id,block,k,flags",
    [(2, 1 << 31, 0, 0), (2, (1 << 20) + 1, 0, 0), (3, 1 << 30, 0, FP16), (4, 0xFFFFFFFF, 0, 0),
     (TOPK, 1 << 31, 1, 0), (TOPK, 65537, 65537, 0), (TOPK, 65536, 1, FP16),
     (TOPK, 8192, 1, 0), (SPARSE, 1 << 31, 1 | 2 * SPARSE_BITS, 0),
     (SPARSE, 65537, 64 | 2 * SPARSE_BITS, 0), (SPARSE, 65536, 26 | 2 * SPARSE_BITS, FP16),
     (SPARSE, 1, 2 | SPARSE_BITS, 0)],
)  # fmt: skip
def test_huge_block_field_is_refused(codec_id, block, k, flags):
    buf = _frame(codec_id, 10, block, k, flags)  # payload_len and CRCs agree with the fields
    with pytest.raises(PayloadError, match="block"):
        decode(buf)
    with pytest.raises(PayloadError, match="block"):
        decode(buf, max_numel=1 << 40)


def _extreme_settings() -> list[tuple[str, dict]]:
    """Config (compression.*) settings at the edges the codecs allow, via codec_options."""
    out: list[tuple[str, dict]] = [("none", {}), ("bf16", {})]
    for codec in ("int8", "int4", "fp4"):
        for block, sd in ((2, "fp32"), (1 << 20, "fp16")):
            out.append((codec, dict(block=block, scale_dtype=sd)))
    for block, frac, sd in ((256, 1e-9, "fp16"), (4096, 1e-9, "fp16"), (4096, 1e-9, "fp32"),
                            (65536, 21 / 65536, "fp16"), (65536, 1.0, "fp32"), (1, 1.0, "fp32"),
                            (256, 0.1, "fp32")):  # fmt: skip
        out.append(("topk", dict(block=block, scale_dtype=sd, topk_fraction=frac)))
    for block, k, bits, sd in ((4096, 1, 1, "fp16"), (65536, 27, 2, "fp16"), (1, 1, 1, "fp32"),
                               (65536, 65536, 4, "fp32"), (4096, 64, 2, "fp32")):  # fmt: skip
        out.append(("sparse", dict(block=block, scale_dtype=sd, sparse_k=k, sparse_bits=bits)))
    return out


@pytest.mark.parametrize("codec,cfg", _extreme_settings(), ids=lambda v: str(v))
def test_honest_frames_at_extreme_config_settings_decode_by_default(backend, codec, cfg):
    block, frac = cfg.get("block", 256), cfg.get("topk_fraction", 0.1)
    sd = cfg.get("scale_dtype", "fp32")
    opts = codec_options(codec, block=block, scale_dtype=sd, stochastic=False, topk_fraction=frac,
                         sparse_k=cfg.get("sparse_k", 64), sparse_bits=cfg.get("sparse_bits", 2))  # fmt: skip
    n = 3 * block + 5 if block <= 65536 else 3001
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    buf = encode(x, codec, **opts)
    assert n <= MAX_VALUES_PER_BYTE * len(buf)
    y = decode(buf)  # no max_numel: the default bound admits it
    assert y.numel() == n and torch.equal(y, decode(buf, max_numel=n))
    if codec in ("topk", "sparse"):
        assert int((y != 0).sum()) <= opts["k"] * -(-n // block)
    else:
        assert (y - x).abs().max() <= x.abs().max() * 0.35  # a round trip, not just a size
    if codec == "topk" and block == 4096 and opts["k"] == 1 and cfg["scale_dtype"] == "fp16":
        assert n / (len(buf) - HEADER_SIZE) > 600  # the most top-k expands: inside the bound
    if codec == "sparse" and block == 65536 and opts["k"] == 27:  # at its edge: 1008 per byte
        assert lc.make_codec(codec, **opts).payload_nbytes(block) * 1000 < block


def test_topk_settings_past_the_expansion_bound_fail_at_configuration():
    opts = codec_options("topk", block=65536, scale_dtype="fp32", stochastic=False,
                         topk_fraction=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="values per byte"):
        encode(torch.zeros(10), "topk", **opts)  # the sender learns at start-up, not a peer


def test_explicit_max_numel_takes_precedence(monkeypatch):
    x = torch.randn(1000)
    buf = encode(x, "int4", block=128)  # about 2 values per byte
    with pytest.raises(PayloadError, match="max_numel 999"):
        decode(buf, max_numel=999)  # a smaller explicit bound wins over the default
    monkeypatch.setattr(lc, "MAX_VALUES_PER_BYTE", 1)  # a default tighter than this frame
    with pytest.raises(PayloadError, match="default bound"):
        decode(buf)
    y = decode(buf, max_numel=1000)  # a larger explicit bound wins as well
    assert torch.equal(y, decode(buf, max_numel=1 << 30))
    assert y.numel() == 1000 and len(buf) == HEADER_SIZE + 8 * 2 + 500  # 1.86 values/byte
