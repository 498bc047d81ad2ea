"""Benchmark of the loco codecs: encode-with-error-feedback and decode-accumulate throughput.

Prints ONE JSON line. Throughput is GB/s of fp32 input (4 bytes x numel / seconds, median of
``--reps`` runs), measured in the same run as the eager pure-torch reference
(``loco.compress.reference``) and as a copy into a preallocated buffer (``dst.copy_(x)``), so the
ratios compare like with like: the copy runs alternately with each measured pass. Per codec:

* ``encode_ef``: ONE fused pass ``(x + residual) -> (payload, new residual)`` (the kernel);
  it must read x and the residual and write the residual back, i.e. at least 3 bytes of memory
  traffic per input byte against the copy's 2 (3 with write-allocate), so on a memory-bound
  machine it cannot pass ~0.6-0.9x of the copy;
* ``encode``: the same kernel without error feedback (reads x, writes the payload);
* ``decode_acc``: ONE fused pass ``out += decode(payload)``;
* ``frame_ef``: ``ErrorFeedback.encode`` end to end (kernel, CRC-32C, header, copy into bytes);
* ``bytes_per_param``: payload bytes per value (the 40-byte header excluded);
* ``*_bw_vs_copy``: the same ratios in bytes moved per second (the copy moves 8 bytes a value,
  encode+EF 12 + bytes_per_param, decode-acc 8 + bytes_per_param), i.e. the fraction of the
  copy's memory bandwidth a kernel reaches.

With ``--device cuda`` the CUDA kernels are timed against the reference on the GPU and a
device-to-device copy into a preallocated tensor, each call between two CUDA events (the
kernels' status read-back included), median of 20; each payload, residual and decoded output
is also checked bit for bit against the reference (``bitwise_equal_ref``).

    python scripts/bench/compress.py                      # 64M fp32 values, 2 threads, CPU
    python scripts/bench/compress.py --numel 4194304      # quick run
    python scripts/bench/compress.py --codecs sign,ternary --check   # some codecs, bits checked
    python scripts/bench/compress.py --device cuda        # GPU check (CUDA torch + nvcc)
    python scripts/bench/compress.py --threads 1 --clock cpu   # one core, CPU time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timer(device: torch.device, clock: str) -> Callable[..., tuple[float, float]]:
    """``time(fn, reps, base)`` -> (median seconds of fn, median seconds of base). The two run
    alternately so that a change in machine load affects both alike (2 shared cores).
    ``clock="cpu"`` counts this thread's CPU time instead of wall time (with ``--threads 1``:
    the cost of the work itself, free of time spent descheduled on a busy machine)."""
    now = time.thread_time if clock == "cpu" else time.perf_counter

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":  # device time between two events on the current stream
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = now()
        fn()
        return now() - t0

    def median_times(
        fn: Callable[[], object], reps: int, base: Callable[[], object]
    ) -> tuple[float, float]:
        fn()  # warm-up: page faults, thread pool, kernel caches
        base()
        a, b = [], []
        for _ in range(reps):
            b.append(run(base))
            a.append(run(fn))
        return statistics.median(a), statistics.median(b)

    return median_times


def _bench_codec(name, x, dst, args, timer) -> dict[str, object]:  # noqa: ANN001
    import loco.compress as lc
    from loco.compress import codecs as codecs_mod
    from loco.compress import reference as ref

    ops = lc._ext.ext_ops()
    n = x.numel()
    gb = 4 * n / 1e9
    c = lc.make_codec(name)
    a = (c.codec_id, c.block, c.k_field, c.fp16_scale)
    payload = torch.empty(c.payload_nbytes(n), dtype=torch.uint8, device=x.device)
    residual = torch.zeros_like(x)
    out = torch.zeros_like(x)
    # what loco uses: the kernels; top-k and sign of device tensors go through the host (no
    # CUDA kernel)
    on_host = x.device.type != "cpu" and name in ("topk", "sign")
    kernel = codecs_mod._OnHost if on_host else ops

    copy = lambda: dst.copy_(x)  # noqa: E731
    enc, copy_enc = timer(lambda: kernel.quantize(x, residual, payload, *a, -1), args.reps, copy)
    plain, copy_plain = timer(lambda: kernel.quantize(x, None, payload, *a, -1), args.reps, copy)
    dec, copy_dec = timer(lambda: kernel.dequantize(payload, out, *a, True), args.reps, copy)
    enc_ref, copy_ref = timer(
        lambda: ref.quantize(x, residual, payload, *a, -1), args.ref_reps, copy
    )
    dec_ref, _ = timer(lambda: ref.dequantize(payload, out, *a, True), args.ref_reps, copy)
    # Memory traffic per value (bytes; write-allocate not counted): the copy reads 4 and
    # writes 4; encode+EF reads x and r and writes r and the payload; decode-acc reads the
    # payload and out and writes out. *_bw_vs_copy compares these bandwidths.
    bpp = c.payload_nbytes(n) / n
    t_copy, t_ef, t_enc, t_dec = 8.0, 12.0 + bpp, 4.0 + bpp, 8.0 + bpp
    row: dict[str, object] = {
        "bytes_per_param": round(bpp, 4),
        "copy_gbps": round(gb / copy_enc, 2),
        "encode_ef_gbps": round(gb / enc, 2),
        "encode_ef_vs_copy": round(copy_enc / enc, 2),
        "encode_ef_vs_ref": round(enc_ref / enc, 1),
        "encode_ef_bw_vs_copy": round(copy_enc / enc * t_ef / t_copy, 2),
        "encode_gbps": round(gb / plain, 2),
        "encode_vs_copy": round(copy_plain / plain, 2),
        "encode_bw_vs_copy": round(copy_plain / plain * t_enc / t_copy, 2),
        "decode_acc_gbps": round(gb / dec, 2),
        "decode_acc_vs_copy": round(copy_dec / dec, 2),
        "decode_acc_bw_vs_copy": round(copy_dec / dec * t_dec / t_copy, 2),
        "decode_acc_vs_ref": round(dec_ref / dec, 1),
        "ref_encode_ef_gbps": round(gb / enc_ref, 3),
        "ref_decode_acc_gbps": round(gb / dec_ref, 3),
    }
    if x.device.type == "cpu":
        ef = lc.ErrorFeedback(c, n)
        frame, _ = timer(lambda: ef.encode(x), max(1, args.reps // 2), copy)
        row["frame_ef_gbps"] = round(gb / frame, 2)
        crc, _ = timer(lambda: ops.crc32c(payload, 0), args.reps, copy)
        row["crc32c_gbps"] = round(payload.numel() / 1e9 / crc, 2)
    if args.check or x.device.type == "cuda":
        # the contract: the kernel equals the pure-torch reference run on the CPU, bit for bit
        r1 = torch.zeros_like(x)
        p1 = torch.empty_like(payload)
        kernel.quantize(x, r1, p1, *a, -1)
        o1 = torch.ones_like(x)
        kernel.dequantize(p1, o1, *a, True)
        xc = x.cpu()
        r2, p2, o2 = torch.zeros_like(xc), torch.empty_like(p1, device="cpu"), torch.ones_like(xc)
        ref.quantize(xc, r2, p2, *a, -1)
        ref.dequantize(p2, o2, *a, True)
        row["bitwise_equal_ref"] = bool(
            torch.equal(p1.cpu(), p2)
            and torch.equal(r1.cpu().view(torch.int32), r2.view(torch.int32))
            and torch.equal(o1.cpu().view(torch.int32), o2.view(torch.int32))
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 values (default 64M)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs of each kernel (5; cuda 20)")
    ap.add_argument("--ref-reps", type=int, default=1, help="timed runs of each reference")
    ap.add_argument("--codecs", default="none,bf16,int8,int4,fp4,topk,sparse,sign,ternary")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--check", action="store_true", help="also compare with the reference bits")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (1 thread)"
    )
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 20 if args.device.startswith("cuda") else 5
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import loco.compress as lc

    t0 = time.perf_counter()
    ops = lc._ext.ext_ops()
    load_s = time.perf_counter() - t0
    if ops is None:
        raise SystemExit(f"compiled kernels unavailable: {lc.ext_error()}")
    if device.type == "cuda" and not lc._ext.ext_has_cuda():
        raise SystemExit("the loaded kernels have no CUDA build (need CUDA torch and nvcc)")

    if args.clock == "cpu" and (args.threads != 1 or device.type != "cpu"):
        raise SystemExit("--clock cpu measures one CPU thread: use it with --threads 1 on the CPU")
    timer = _timer(device, args.clock)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.numel, generator=gen).to(device)
    dst = torch.empty_like(x)
    result: dict[str, object] = {
        "bench": "compress",
        "numel": args.numel,
        "device": args.device,
        "threads": args.threads,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ext_load_s": round(load_s, 3),
        "timing": f"{args.clock} clock, median of {args.reps} (reference: {args.ref_reps})",
        "codecs": {},
    }
    for name in args.codecs.split(","):
        result["codecs"][name] = _bench_codec(name, x, dst, args, timer)  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
