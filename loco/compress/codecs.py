"""The codecs: one small ``Codec`` protocol, one class per wire format.

Every codec works on a flat fp32 vector cut into blocks. ``quantize`` is ONE fused pass
``(x + residual) -> (payload, new residual)`` and ``dequantize`` is ONE fused pass
``out (+)= decode(payload)``; both run the compiled ``torch.ops.loco`` kernels when loaded and the
bit-identical pure-torch reference otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from loco.compress import reference as ref
from loco.compress._ext import ext_has_cuda, ext_ops
from loco.compress.wire import FLAG_FP16_SCALE, FLAG_STOCHASTIC, MAX_VALUES_PER_BYTE, PayloadError

__all__ = [
    "Codec",
    "NoneCodec",
    "Bf16Codec",
    "Int8Codec",
    "Int4Codec",
    "Fp4Codec",
    "TopkCodec",
    "SparseCodec",
    "SignCodec",
    "TernaryCodec",
    "CODECS",
    "make_codec",
    "codec_from_header",
]

_M32 = 0xFFFFFFFF
_ENCODE_ERRORS = {
    ref.NON_FINITE: "the input (plus residual) contains NaN or Inf; a sender never ships "
    "non-finite values: fix the producer or skip this round",
    ref.OVERFLOW: "a value or block scale does not fit the target format; use "
    "scale_dtype='fp32' or a wider codec",
}
_DECODE_ERRORS = {
    ref.BAD_SCALE: "a block scale is negative, NaN, Inf or so large that a value decodes to Inf "
    "(sparse: or a chunk's low scale is above its high one)",
    ref.BAD_INDEX: "top-k indices are not strictly increasing inside their block",
    ref.BAD_PADDING: "the unused low nibble of the last byte (sparse: a padding bit; sign, "
    "ternary: a bit or trit past the last value) is not zero",
    ref.BAD_VALUE: "a value is NaN or Inf",
    ref.BAD_TRIT: "a ternary byte is above 242 (five trits hold at most 3^5 - 1)",
}


@runtime_checkable
class Codec(Protocol):
    """What the framing layer needs from a codec.

    Contract: ``quantize`` writes exactly ``payload_nbytes(x.numel())`` bytes and, when
    ``residual`` is given, sets ``residual = x + residual - decode(payload)`` in the same pass.
    ``dequantize`` checks every scale / index / padding byte before touching ``out``.
    ``k_field`` is the header's (and the kernels') k argument: ``k`` for top-k,
    ``k | bits << 24`` for sparse, 0 otherwise.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]

    @property
    def block(self) -> int: ...
    @property
    def k(self) -> int: ...
    @property
    def k_field(self) -> int: ...
    @property
    def flags(self) -> int: ...

    def payload_nbytes(self, numel: int) -> int: ...

    def quantize(
        self, x: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, seed: int
    ) -> None: ...

    def dequantize(self, payload: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None: ...


def _backend(device: torch.device, codec_id: int):  # noqa: ANN202 - ops namespace or module
    if device.type == "cpu":
        ops = ext_ops()
        return ops if ops is not None else ref
    if device.type == "cuda" and codec_id in (ref.TOPK, ref.SIGN):
        return _OnHost  # no CUDA kernel: the host's
    if device.type == "cuda" and ext_has_cuda():
        return ext_ops()
    if device.type == "cuda" and codec_id == ref.SPARSE:
        return _OnHost  # no CUDA build: the host, as top-k (same bytes as the CPU)
    return ref


class _OnHost:
    """top-k (and sparse without CUDA kernels) of device tensors, computed on the CPU (kernel
    or reference) and copied back.

    top-k has no CUDA kernel; torch's own ops on the GPU gave payloads that differ from the CPU
    reference's bytes, so device tensors go through the one host implementation instead.
    """

    @staticmethod
    def quantize(x, residual, payload, *args) -> int:  # noqa: ANN001 - the ops' signature
        be = _backend(torch.device("cpu"), ref.TOPK)
        r = residual.cpu() if residual is not None else None
        p = torch.empty(payload.shape, dtype=payload.dtype)
        status = be.quantize(x.cpu(), r, p, *args)
        if status == 0:
            payload.copy_(p)
            if residual is not None:
                residual.copy_(r)
        return status

    @staticmethod
    def dequantize(payload, out, *args) -> int:  # noqa: ANN001 - the ops' signature
        be = _backend(torch.device("cpu"), ref.TOPK)
        o = out.cpu()
        status = be.dequantize(payload.cpu(), o, *args)
        if status == 0:
            out.copy_(o)
        return status


@dataclass(frozen=True)
class _BaseCodec:
    """Shared implementation; subclasses fix the name, id, defaults and option checks."""

    block: int = 0
    k: int = 0
    scale_dtype: str = "fp32"
    rounding: str = "nearest"

    name: ClassVar[str] = ""
    codec_id: ClassVar[int] = -1
    has_blocks: ClassVar[bool] = True
    deterministic: ClassVar[bool] = False  # a code with no rounding to make stochastic

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"{self.name}: rounding={self.rounding!r}; use 'nearest' or 'stochastic'"
            )
        if self.deterministic and self.rounding != "nearest":
            raise ValueError(
                f"{self.name}: a {self.name} code has no stochastic rounding; use 'nearest'"
            )
        if self.scale_dtype not in ("fp32", "fp16"):
            raise ValueError(f"{self.name}: scale_dtype={self.scale_dtype!r}; use 'fp32' or 'fp16'")
        if self.has_blocks and not (1 <= self.block <= 1 << 20):
            raise ValueError(f"{self.name}: block={self.block}; use 1 <= block <= 1048576")
        if not self.has_blocks and (self.block or self.k or self.scale_dtype != "fp32"):
            raise ValueError(f"{self.name} has no blocks: leave block, k and scale_dtype unset")
        if self.codec_id not in (ref.TOPK, ref.SPARSE) and self.k:
            raise ValueError(f"{self.name}: k={self.k} applies to topk only; leave it unset")

    @property
    def fp16_scale(self) -> bool:
        return self.has_blocks and self.scale_dtype == "fp16"

    @property
    def flags(self) -> int:
        return (FLAG_FP16_SCALE if self.fp16_scale else 0) | (
            FLAG_STOCHASTIC if self.rounding == "stochastic" else 0
        )

    @property
    def k_field(self) -> int:
        """The header's k field, also the kernels' k argument."""
        return self.k

    def payload_nbytes(self, numel: int) -> int:
        """Bytes of the payload (header excluded) for ``numel`` values."""
        return ref.payload_nbytes(numel, self.codec_id, self.block, self.k_field, self.fp16_scale)

    def bytes_per_param(self, numel: int = 1 << 26) -> float:
        """Payload bytes per value for a vector of ``numel`` values (header excluded)."""
        return self.payload_nbytes(numel) / numel

    def quantize(
        self, x: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor, seed: int
    ) -> None:
        """Fill ``payload`` from ``x (+ residual)``; raise ValueError on NaN/Inf or overflow."""
        s = seed if self.rounding == "stochastic" else -1
        be = _backend(x.device, self.codec_id)
        status = be.quantize(x, residual, payload, self.codec_id, self.block, self.k_field,
                             self.fp16_scale, s)  # fmt: skip
        if status:
            raise ValueError(f"loco.compress {self.name}: {_ENCODE_ERRORS.get(status, status)}")

    def dequantize(self, payload: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        """``out (+)= decode(payload)``; raise PayloadError (out untouched) on bad content."""
        be = _backend(out.device, self.codec_id)
        status = be.dequantize(payload, out, self.codec_id, self.block, self.k_field,
                               self.fp16_scale, accumulate)  # fmt: skip
        if status:
            raise PayloadError(f"{self.name} payload: {_DECODE_ERRORS.get(status, status)}")


@dataclass(frozen=True)
class NoneCodec(_BaseCodec):
    """fp32, exact: 4 bytes per value."""

    name: ClassVar[str] = "none"
    codec_id: ClassVar[int] = ref.NONE
    has_blocks: ClassVar[bool] = False


@dataclass(frozen=True)
class Bf16Codec(_BaseCodec):
    """bfloat16, round to nearest even (or stochastic): 2 bytes per value."""

    name: ClassVar[str] = "bf16"
    codec_id: ClassVar[int] = ref.BF16
    has_blocks: ClassVar[bool] = False


@dataclass(frozen=True)
class Int8Codec(_BaseCodec):
    """Blockwise absmax int8: scale = absmax / 127 per block, codes in [-127, 127]."""

    block: int = 256
    name: ClassVar[str] = "int8"
    codec_id: ClassVar[int] = ref.INT8


@dataclass(frozen=True)
class Int4Codec(_BaseCodec):
    """Blockwise absmax int4: scale = absmax / 7, codes in [-7, 7], first value in the high
    nibble. Default fp16 scales: 0.5156 bytes per value at block 128."""

    block: int = 128
    scale_dtype: str = "fp16"
    name: ClassVar[str] = "int4"
    codec_id: ClassVar[int] = ref.INT4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block % 2:
            raise ValueError(f"int4: block={self.block} must be even")


@dataclass(frozen=True)
class Fp4Codec(_BaseCodec):
    """FP4 E2M1 (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6) with scale = absmax / 6 per block, as in
    Streaming DiLoCo / OCP MX; sign in bit 3, first value in the high nibble."""

    block: int = 128
    scale_dtype: str = "fp16"
    name: ClassVar[str] = "fp4"
    codec_id: ClassVar[int] = ref.FP4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block % 2:
            raise ValueError(f"fp4: block={self.block} must be even")


@dataclass(frozen=True)
class TopkCodec(_BaseCodec):
    """Per-block top-k by magnitude (ties: lower index), indices as u8 (block <= 256) or u16,
    values as int8 with one absmax scale per block. Use with error feedback.

    A block's payload (scale + k indices + k values) must carry at most ``MAX_VALUES_PER_BYTE``
    (1024) values per byte, so that ``decode``'s default bound admits every honest frame and a
    tiny frame cannot claim a huge vector: any k when block <= 4096; above that
    ``k >= (block / 1024 - scale bytes) / 3`` (block 65536: k >= 20 with fp32 scales).
    """

    block: int = 256
    k: int = 8
    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = ref.TOPK

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block > 65536:
            raise ValueError(f"topk: block={self.block}; use block <= 65536")
        if not 1 <= self.k <= self.block:
            raise ValueError(f"topk: k={self.k}; use 1 <= k <= block ({self.block})")
        per_block = (2 if self.fp16_scale else 4) + self.k * (2 if self.block <= 256 else 3)
        if self.block > MAX_VALUES_PER_BYTE * per_block:
            raise ValueError(
                f"topk: block={self.block} with k={self.k} sends {per_block} bytes per block, "
                f"over {MAX_VALUES_PER_BYTE} values per byte; raise k or use block <= 4096"
            )


@dataclass(frozen=True)
class SparseCodec(_BaseCodec):
    """SparseLoCo-style sparse low-bit deltas: per chunk of ``block`` values the ``k`` largest
    magnitudes (ties: lower index), each as a chunk-relative index of ceil(log2(block)) bits and
    a ``bits``-bit code (sign + magnitude index m on the grid lo + m * (hi - lo) / (L - 0.5),
    L = 2^(bits-1), with lo / hi the smallest sent / largest magnitude of the chunk, two scales
    per chunk). Use with error feedback. Defaults: 120 bytes per 4096 values (0.0293 per value;
    fp16 scales 0.0283). Layout and rounding: docs/wire-format.md.

    ``bits`` in 1..4 (1: the sign only, every magnitude (lo + hi) / 2). The header's k field
    carries ``k | bits << 24``. A chunk's record must carry at most ``MAX_VALUES_PER_BYTE``
    values per byte: any k when block <= 4096.
    """

    block: int = 4096
    k: int = 64
    bits: int = 2
    name: ClassVar[str] = "sparse"
    codec_id: ClassVar[int] = ref.SPARSE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block > 65536:
            raise ValueError(f"sparse: block={self.block}; use block <= 65536")
        if not 1 <= self.k <= self.block:
            raise ValueError(f"sparse: k={self.k}; use 1 <= k <= block ({self.block})")
        if not 1 <= self.bits <= 4:
            raise ValueError(f"sparse: bits={self.bits}; use 1 <= bits <= 4")
        rec = ref.sparse_record(
            self.k, ref.sparse_index_bits(self.block), self.bits, 2 if self.fp16_scale else 4
        )
        if self.block > MAX_VALUES_PER_BYTE * rec:
            raise ValueError(
                f"sparse: block={self.block} with k={self.k} sends {rec} bytes per chunk, "
                f"over {MAX_VALUES_PER_BYTE} values per byte; raise k or use block <= 4096"
            )

    @property
    def k_field(self) -> int:
        return self.k | self.bits << ref.SPARSE_BITS_SHIFT


@dataclass(frozen=True)
class SignCodec(_BaseCodec):
    """One bit per value: the sign, decoded as plus or minus the block's mean magnitude (the
    scale that minimizes a sign code's squared error; layout and the fixed-point mean in
    :mod:`loco.compress.sign_ref`). 0.1406 bytes per value at block 256 with fp32 scales
    (0.1328 fp16). Use with error feedback; deterministic (no stochastic rounding)."""

    block: int = 256
    name: ClassVar[str] = "sign"
    codec_id: ClassVar[int] = ref.SIGN
    deterministic: ClassVar[bool] = True


@dataclass(frozen=True)
class TernaryCodec(_BaseCodec):
    """Values in {-s, 0, +s}, five trits per byte: a value is sent when its magnitude is above
    0.7 times its block's mean, as plus or minus the mean magnitude of the values sent (layout
    and fixed point in :mod:`loco.compress.ternary_ref`). 0.2078 bytes per value at block 512
    with fp32 scales (0.2039 fp16: 1.63 bits). Use with error feedback; deterministic (no
    stochastic rounding)."""

    block: int = 512
    name: ClassVar[str] = "ternary"
    codec_id: ClassVar[int] = ref.TERNARY
    deterministic: ClassVar[bool] = True


CODECS: dict[str, type[_BaseCodec]] = {
    c.name: c
    for c in (
        NoneCodec, Bf16Codec, Int8Codec, Int4Codec, Fp4Codec, TopkCodec, SparseCodec, SignCodec,
        TernaryCodec,
    )
}  # fmt: skip
_BY_ID = {c.codec_id: c for c in CODECS.values()}
_OPTIONS = {
    "none": (),
    "bf16": ("rounding",),
    "int8": ("block", "scale_dtype", "rounding"),
    "int4": ("block", "scale_dtype", "rounding"),
    "fp4": ("block", "scale_dtype", "rounding"),
    "topk": ("block", "k", "scale_dtype", "rounding"),
    "sparse": ("block", "k", "bits", "scale_dtype", "rounding"),
    "sign": ("block", "scale_dtype", "rounding"),
    "ternary": ("block", "scale_dtype", "rounding"),
}


def make_codec(codec: str | Codec, **options: object) -> Codec:
    """Codec instance from a name and options; ValueError names the allowed values."""
    if not isinstance(codec, str):
        if options:
            raise ValueError("pass options either in the Codec instance or as keywords, not both")
        return codec
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {sorted(CODECS)}")
    bad = sorted(set(options) - set(_OPTIONS[codec]))
    if bad:
        raise ValueError(f"codec {codec!r} takes options {list(_OPTIONS[codec])}, not {bad}")
    return CODECS[codec](**options)  # type: ignore[arg-type]


def codec_from_header(codec_id: int, block: int, k: int, flags: int) -> Codec:
    """Codec described by header fields; PayloadError when they are inconsistent."""
    cls = _BY_ID.get(codec_id)
    if cls is None:
        raise PayloadError(f"unknown codec id {codec_id}")
    fp16 = bool(flags & FLAG_FP16_SCALE)
    rounding = "stochastic" if flags & FLAG_STOCHASTIC else "nearest"
    if not cls.has_blocks:
        if block or k or fp16:
            raise PayloadError(f"{cls.name}: block/k/fp16-scale fields must be 0")
        return cls(rounding=rounding)
    if cls not in (TopkCodec, SparseCodec) and k:
        raise PayloadError(f"{cls.name}: k field must be 0, got {k}")
    kw: dict[str, int] = {}
    if cls is TopkCodec:
        kw = {"k": k}
    elif cls is SparseCodec:
        kw = dict(zip(("k", "bits"), ref.sparse_fields(k), strict=True))
    try:  # every field is checked (ranges, expansion bound) before anything is allocated
        return cls(block=block, scale_dtype="fp16" if fp16 else "fp32", rounding=rounding, **kw)
    except ValueError as e:
        raise PayloadError(f"bad header field: {e}") from None
