"""Compression of outer-step payloads: codecs, error feedback and a checked wire format.

Public API (a contract, see docs/architecture.md, "Public contracts")::

    buf = encode(x, "int8", block=256)        # -> bytes, self-describing
    y = decode(buf)                            # -> flat tensor of x's dtype
    decode_accumulate(buf, out)                # out += decode(buf), fused, no temporary
    ef = ErrorFeedback("int4", numel)          # keeps the residual between rounds
    buf = ef.encode(delta)                     # ONE pass: (delta + residual) -> payload, residual

Any malformed buffer makes ``decode`` raise :class:`PayloadError` (a ValueError) and nothing
else. Encoding NaN/Inf raises ValueError. Codecs: none, bf16, int8, int4, fp4, topk, sparse,
sign, ternary; byte layouts in docs/wire-format.md. The compiled ``torch.ops.loco`` kernels are
used when they build (see ``loco.compress._ext``); otherwise the bit-identical pure-torch
reference runs.
"""

from __future__ import annotations

import warnings

import torch

from loco.compress import reference
from loco.compress._ext import ext_available, ext_error, ext_ops
from loco.compress.codecs import CODECS, Codec, codec_from_header, make_codec
from loco.compress.wire import (
    DTYPE_IDS,
    DTYPES,
    HEADER_SIZE,
    MAX_VALUES_PER_BYTE,
    Header,
    PayloadError,
)

__all__ = [
    "encode",
    "decode",
    "decode_accumulate",
    "encode_frame",
    "ErrorFeedback",
    "PayloadError",
    "MAX_VALUES_PER_BYTE",
    "Codec",
    "CODECS",
    "make_codec",
    "crc32c",
    "ext_available",
    "ext_error",
]

Buffer = bytes | bytearray | memoryview


def crc32c(data: Buffer | torch.Tensor, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, chained like ``zlib.crc32``."""
    ops = ext_ops()
    if ops is None:
        return reference.crc32c(data, crc)
    t = data if isinstance(data, torch.Tensor) else _as_u8(data)
    return int(ops.crc32c(t.contiguous().view(torch.uint8), crc))


def _as_u8(buf: Buffer) -> torch.Tensor:
    mv = memoryview(buf).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are fine: kernels only read them
        return torch.frombuffer(mv, dtype=torch.uint8)


def _flat_f32(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_IDS:
        raise ValueError(f"dtype {x.dtype} not supported; use float32, float16 or bfloat16")
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def _fold_seed(seed: int) -> int:
    if seed < 0:
        raise ValueError(f"seed={seed}; use a non-negative integer")
    return (seed ^ (seed >> 32) ^ (seed >> 64)) & 0xFFFFFFFF


def _frame(
    codec: Codec,
    x32: torch.Tensor,
    residual: torch.Tensor | None,
    seed: int,
    dtype_id: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n = x32.numel()
    plen = codec.payload_nbytes(n)
    if out is not None and out.numel() == HEADER_SIZE + plen:
        frame = out  # reused buffer: no allocation, no page faults
    else:
        frame = torch.empty(HEADER_SIZE + plen, dtype=torch.uint8)
    payload = frame[HEADER_SIZE:]
    if x32.device.type == "cpu":
        codec.quantize(x32, residual, payload, seed)
    else:
        dev = torch.empty(plen, dtype=torch.uint8, device=x32.device)
        codec.quantize(x32, residual, dev, seed)
        payload.copy_(dev)
    head = Header(codec.codec_id, dtype_id, codec.flags, n, codec.block, codec.k_field, plen,
                  crc32c(payload))  # fmt: skip
    frame[:HEADER_SIZE].copy_(torch.frombuffer(bytearray(head.pack(crc32c)), dtype=torch.uint8))
    return frame


def encode_frame(x: torch.Tensor, codec: str | Codec = "int8", *, seed: int = 0,
                 **options: object) -> torch.Tensor:  # fmt: skip
    """Like :func:`encode` but returns the frame as a CPU uint8 tensor (no copy into bytes);
    slice it to send chunks."""
    c = make_codec(codec, **options)
    return _frame(c, _flat_f32(x), None, _fold_seed(seed), DTYPE_IDS[x.dtype])


def encode(x: torch.Tensor, codec: str | Codec = "int8", *, seed: int = 0,
           **options: object) -> bytes:  # fmt: skip
    """Encode the values of ``x`` (any shape; fp32/fp16/bf16; CPU or CUDA) into one frame.

    Args:
        x: the tensor; it is flattened, and ``decode`` returns a flat tensor of its dtype.
        codec: ``none``, ``bf16``, ``int8``, ``int4``, ``fp4``, ``topk``, ``sparse`` or a
            Codec instance.
        seed: stochastic-rounding seed (used only with ``rounding="stochastic"``).
        **options: codec options: ``block``, ``k`` (topk, sparse), ``bits`` (sparse),
            ``scale_dtype`` ("fp32"/"fp16"), ``rounding`` ("nearest"/"stochastic").

    Raises:
        ValueError: unknown codec or option, or ``x`` holds NaN/Inf (never shipped).
    """
    return encode_frame(x, codec, seed=seed, **options).numpy().tobytes()


def _parse(buf: Buffer, max_numel: int | None) -> tuple[Header, Codec, torch.Tensor]:
    """Check everything but the content; nothing sized by the header is allocated. ``max_numel``
    None means the default bound ``MAX_VALUES_PER_BYTE * len(buf)``."""
    try:
        mv = memoryview(buf).cast("B")
    except TypeError as e:
        raise PayloadError(f"not a bytes-like buffer: {type(buf).__name__}") from e
    head = Header.unpack(mv, crc32c)
    if max_numel is None and head.numel > MAX_VALUES_PER_BYTE * len(mv):
        raise PayloadError(
            f"numel {head.numel} exceeds the default bound of {MAX_VALUES_PER_BYTE} values per "
            f"byte of a {len(mv)}-byte frame (pass max_numel to decode bigger frames)"
        )
    if max_numel is not None and head.numel > max_numel:
        raise PayloadError(f"numel {head.numel} exceeds max_numel {max_numel}")
    codec = codec_from_header(head.codec_id, head.block, head.k, head.flags)
    expected = codec.payload_nbytes(head.numel)
    if head.payload_len != expected:
        raise PayloadError(
            f"payload_len field {head.payload_len} != {expected} implied by the header"
        )
    if len(mv) != HEADER_SIZE + expected:
        what = "truncated" if len(mv) < HEADER_SIZE + expected else "oversized"
        raise PayloadError(f"{what}: {len(mv)} bytes, header implies {HEADER_SIZE + expected}")
    payload = _as_u8(mv)[HEADER_SIZE:]
    if crc32c(payload) != head.payload_crc:
        raise PayloadError("payload checksum mismatch")
    return head, codec, payload


def decode(buf: Buffer, *, device: str | torch.device = "cpu",
           max_numel: int | None = None) -> torch.Tensor:  # fmt: skip
    """Decode a frame into a new flat tensor (dtype from the header) on ``device``.

    Every field, length and checksum is checked before anything sized by the header is
    allocated or any value is read. ``max_numel`` bounds the number of values a sender can make
    us allocate; by default (None) it is ``MAX_VALUES_PER_BYTE * len(buf)`` (1024 values, 4 KiB
    of fp32, per received byte), which every honest frame meets (see ``TopkCodec``). An
    explicit ``max_numel`` replaces the default: pass the exact count you expect when you know it.

    Raises:
        PayloadError: the buffer is malformed in any way.
    """
    head, codec, payload = _parse(buf, max_numel)
    device = torch.device(device)
    try:
        out = torch.empty(head.numel, dtype=torch.float32, device=device)
    except RuntimeError as e:  # allocation failure for an absurd numel
        raise PayloadError(f"cannot allocate {head.numel} values: {e}") from None
    codec.dequantize(payload.to(device), out, accumulate=False)
    dtype = DTYPES[head.dtype_id]
    if dtype == torch.float32:
        return out
    big = torch.finfo(dtype).max  # a scale rounded up may step just past the dtype's range
    return out.clamp_(-big, big).to(dtype)


def decode_accumulate(buf: Buffer, out: torch.Tensor) -> None:
    """``out += decode(buf)`` in one fused pass (no full-size temporary when ``out`` is a
    contiguous fp32 tensor). ``out`` is untouched if the buffer is malformed. The decoded values
    are added in fp32; the header's dtype only sets what :func:`decode` returns.

    Raises:
        PayloadError: the buffer is malformed or its numel differs from ``out.numel()``.
        ValueError: ``out`` is not a floating-point tensor.
    """
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise ValueError("out must be a floating-point torch.Tensor")
    head, codec, payload = _parse(buf, out.numel())  # bounded by what out already holds
    if head.numel != out.numel():
        raise PayloadError(f"payload has {head.numel} values, out has {out.numel()}")
    if out.dtype == torch.float32 and out.is_contiguous():
        codec.dequantize(payload.to(out.device), out.view(-1), accumulate=True)
        return
    tmp = torch.zeros(head.numel, dtype=torch.float32, device=out.device)
    codec.dequantize(payload.to(out.device), tmp, accumulate=True)
    out.add_(tmp.view(out.shape).to(out.dtype))


class ErrorFeedback:
    """Stateful encoder with error feedback for one flat range of ``numel`` values.

    Each :meth:`encode` runs ONE fused pass: ``v = x + residual``, payload = codec(v),
    ``residual = v - decode(payload)``, so what was not sent is sent later and the running sum of
    decoded values tracks the running sum of inputs. With ``decay`` < 1 the residual is scaled by
    ``decay`` first (``v = x + decay * residual``): an accumulator that forgets old unsent values,
    as SparseLoCo's error feedback does in place of an outer momentum.

    If ``x`` holds NaN/Inf (or overflows the codec), ValueError is raised and the residual is
    reset to zero (its previous contents may have been partly consumed).
    """

    def __init__(self, codec: str | Codec, numel: int, *, device: str | torch.device = "cpu",
                 seed: int = 0, decay: float = 1.0, **options: object) -> None:  # fmt: skip
        if numel < 0:
            raise ValueError(f"numel={numel}; use numel >= 0")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay}; use 0 <= decay <= 1")
        self.decay = float(decay)
        self.codec = make_codec(codec, **options)
        self.numel = int(numel)
        self.residual = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.seed = _fold_seed(seed)
        self.calls = 0
        self._buf: torch.Tensor | None = None

    def encode_frame(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x + residual`` and update the residual; return the frame as a CPU uint8
        tensor (slice it into chunks to send without another copy). ``out``, when it has the
        frame's size, is reused instead of allocating a new tensor."""
        if x.numel() != self.numel:
            raise ValueError(f"x has {x.numel()} values, this ErrorFeedback holds {self.numel}")
        if x.device != self.residual.device:
            raise ValueError(f"x is on {x.device}, the residual on {self.residual.device}")
        x32 = _flat_f32(x)
        seed = reference._mix32(torch.tensor(self.seed ^ (self.calls * 0x61C88647 & 0xFFFFFFFF)))
        self.calls += 1
        if self.decay != 1.0:
            self.residual.mul_(self.decay)
        try:
            return _frame(self.codec, x32, self.residual, int(seed), DTYPE_IDS[x.dtype], out)
        except ValueError:
            self.residual.zero_()
            raise

    def encode(self, x: torch.Tensor) -> bytes:
        """Encode ``x + residual`` into a frame (bytes) and keep the new residual."""
        self._buf = self.encode_frame(x, self._buf)
        return self._buf.numpy().tobytes()

    def reset(self) -> None:
        """Forget the residual."""
        self.residual.zero_()

    def state_dict(self) -> dict[str, object]:
        """Residual and call counter, for checkpoints."""
        return {"residual": self.residual, "calls": self.calls}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output (same numel)."""
        r = state["residual"]
        if not isinstance(r, torch.Tensor) or r.numel() != self.numel:
            raise ValueError(f"residual must be a tensor of {self.numel} values")
        self.residual.copy_(r.reshape(-1))
        self.calls = int(state["calls"])  # type: ignore[arg-type]
