"""Throughput of the NVMe tier's asynchronous I/O against ``dd`` with direct I/O, same file
system, same run.

Reference: ``dd if=/dev/zero of=F bs=1M count=N oflag=direct`` (write) and
``dd if=F of=/dev/null bs=1M iflag=direct`` (read). Ours: :class:`loco.engine.aio.AioQueue`
moving one aligned N MiB buffer to and from a file opened with ``O_DIRECT``, per backend
(``aio``: Linux AIO, ``threads``: pread/pwrite pool, ``python``: the reference), best of
``--repeat`` runs each (the same for dd). Prints ONE JSON line: MB/s of each and the ratios
ours / dd (the issue asks >= 0.8 both ways).

    python scripts/bench/nvme_io.py --dir DIR [--mb 512] [--repeat 3] [--depth 32] [--chunk-mb 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time

import torch

from loco.engine.aio import AioQueue, aligned_empty, open_direct


def dd(args: list[str]) -> float:
    """MB/s (10^6 bytes per second) of one dd run, from its own summary line."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot read dd's summary: {out[-300:]}")
    return int(m.group(1)) / float(m.group(2)) / 1e6


def ours(path: str, buf: torch.Tensor, backend: str, write: bool, depth: int, chunk: int) -> float:
    fd, direct = open_direct(path, create=True)
    if not direct:
        raise RuntimeError(f"{path}: no O_DIRECT on this file system; pick another --dir")
    q = AioQueue(backend=backend, depth=depth, chunk=chunk)
    t0 = time.perf_counter()
    n = q.wait(q.submit(fd, buf, 0, write=write))
    if write:
        os.fsync(fd)  # O_DIRECT has no dirty pages; metadata only, as dd's direct write
    dt = time.perf_counter() - t0
    q.close()
    os.close(fd)
    return n / dt / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--chunk-mb", type=float, default=1.0)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    f_dd, f_ours = os.path.join(args.dir, "dd.bin"), os.path.join(args.dir, "ours.bin")
    buf = aligned_empty(args.mb << 18)
    buf.copy_(torch.rand(buf.numel()))
    chunk = int(args.chunk_mb * 2**20)
    res: dict[str, dict[str, float]] = {"dd": {"write": 0.0, "read": 0.0}}
    backends = ["aio", "threads", "python"]
    try:
        for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits every row alike
            w = dd(["if=/dev/zero", f"of={f_dd}", "bs=1M", f"count={args.mb}", "oflag=direct"])
            r = dd([f"if={f_dd}", "of=/dev/null", "bs=1M", "iflag=direct"])
            res["dd"] = {"write": max(res["dd"]["write"], w), "read": max(res["dd"]["read"], r)}
            for b in backends:
                row = res.setdefault(b, {"write": 0.0, "read": 0.0})
                for op in ("write", "read"):
                    v = ours(f_ours, buf, b, op == "write", args.depth, chunk)
                    row[op] = max(row[op], v)
    finally:
        for f in (f_dd, f_ours):
            if os.path.exists(f):
                os.remove(f)
    ratio = {
        b: {op: round(res[b][op] / res["dd"][op], 3) for op in ("write", "read")} for b in backends
    }
    print(json.dumps({"bench": "nvme_io", "mb": args.mb, "repeat": args.repeat, "depth": args.depth,
                      "chunk_mb": args.chunk_mb, "mb_per_s": {k: {o: round(v, 1) for o, v in d.items()}
                                                              for k, d in res.items()},
                      "ratio_vs_dd": ratio}))  # fmt: skip


if __name__ == "__main__":
    main()
