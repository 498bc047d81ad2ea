"""Benchmark of the loco codecs: encode-with-error-feedback and decode-accumulate throughput.

Prints ONE JSON line. Every figure is GB/s of fp32 input (4 bytes x numel / seconds, median of
``--reps``), measured in the same run as the eager pure-torch reference and as a copy into a
preallocated buffer (``dst.copy_(x)``), so the ratios compare like with like.

    python scripts/bench/compress.py                      # 64M fp32 values, 2 threads
    python scripts/bench/compress.py --numel 4194304      # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _median_time(fn, reps: int) -> float:  # noqa: ANN001
    fn()  # warm-up (page faults, thread pool)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 values (default 64M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each compiled kernel")
    ap.add_argument("--ref-reps", type=int, default=1, help="timed runs of each reference")
    ap.add_argument("--codecs", default="none,bf16,int8,int4,fp4,topk")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import loco.compress as lc
    from loco.compress import reference as ref

    t0 = time.perf_counter()
    ops = lc._ext.ext_ops()
    load_s = time.perf_counter() - t0
    if ops is None:
        raise SystemExit(f"compiled kernels unavailable: {lc.ext_error()}")

    n = args.numel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    dst = torch.empty_like(x)
    gb = 4 * n / 1e9
    copy_s = _median_time(lambda: dst.copy_(x), args.reps)
    result: dict[str, object] = {
        "bench": "compress",
        "numel": n,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ext_load_s": round(load_s, 3),
        "copy_gbps": round(gb / copy_s, 2),
        "codecs": {},
    }
    for name in args.codecs.split(","):
        c = lc.make_codec(name)
        args_ = (c.codec_id, c.block, c.k, c.fp16_scale)
        payload = torch.empty(c.payload_nbytes(n), dtype=torch.uint8)
        residual = torch.zeros(n)
        out = torch.zeros(n)

        enc = _median_time(lambda: ops.quantize(x, residual, payload, *args_, -1), args.reps)
        dec = _median_time(lambda: ops.dequantize(payload, out, *args_, True), args.reps)
        enc_ref = _median_time(
            lambda: ref.quantize(x, residual, payload, *args_, -1), args.ref_reps
        )
        dec_ref = _median_time(lambda: ref.dequantize(payload, out, *args_, True), args.ref_reps)
        crc = _median_time(lambda: ops.crc32c(payload, 0), args.reps)
        ef = lc.ErrorFeedback(c, n)
        frame = _median_time(lambda: ef.encode(x), max(1, args.reps // 2))
        result["codecs"][name] = {
            "bytes_per_param": round(c.payload_nbytes(n) / n, 4),
            "encode_ef_gbps": round(gb / enc, 2),
            "encode_ef_vs_copy": round(copy_s / enc, 2),
            "encode_ef_vs_ref": round(enc_ref / enc, 1),
            "decode_acc_gbps": round(gb / dec, 2),
            "decode_acc_vs_copy": round(copy_s / dec, 2),
            "decode_acc_vs_ref": round(dec_ref / dec, 1),
            "ref_encode_ef_gbps": round(gb / enc_ref, 3),
            "ref_decode_acc_gbps": round(gb / dec_ref, 3),
            "crc32c_payload_gbps": round(payload.numel() / 1e9 / crc, 2),
            "ef_encode_bytes_gbps": round(gb / frame, 2),
        }
        del payload, residual, out, ef
    print(json.dumps(result))


if __name__ == "__main__":
    main()
