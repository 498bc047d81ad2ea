"""Gossip payload throughput: loopback (plaintext, mTLS) and emulated WAN links.

    python scripts/bench/gossip.py [--mb 256] [--wan-mb 32] [--reps 3] [--streams 4]

Prints ONE JSON line. A partner site (``python -m loco.gossip.peer``, 1 rank) serves an fp32
payload; this process pulls it with GossipClient and checks it bitwise. Figures:
  * loopback_{plain,mtls}_gbps: best of --reps pulls of --mb MB, with ratios to the same-run
    memcpy rate and to a bare gRPC raw-bytes stream of the same size (``raw_grpc_gbps``: the
    transport ceiling on this machine, no loco logic);
  * tbf_*: server and client in two network namespaces joined by a veth with tbf 100 Mbit/s
    (root only; skipped with a reason otherwise); utilization = payload bits / s / link rate;
  * proxy_*: through the user-space DelayProxy adding 100 ms RTT at 100 Mbit/s on loopback,
    with 1 stream and with --streams parallel streams (separate HTTP/2 connections).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loco.certs import write_run_certs  # noqa: E402
from loco.gossip import GossipClient, RankInfo, TlsConfig  # noqa: E402
from loco.gossip.netem import DelayProxy, NetnsLink, netns_available  # noqa: E402
from loco.gossip.peer import synthetic  # noqa: E402

RUN, LAYOUT = "run-test", "layout-abc"


def start_peer(flat: int, *, certs: str | None, host: str = "127.0.0.1", prefix=()) -> tuple:
    cmd = [*prefix, sys.executable, "-m", "loco.gossip.peer", "--site", "us", "--flat-size",
           str(flat), "--host", host, "--chunk-bytes", str(1 << 20)]  # fmt: skip
    cmd += ["--certs", certs] if certs else ["--insecure"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("peer did not start")
    return proc, json.loads(line)["addresses"][0]


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


def pull_once(
    address: str,
    flat: int,
    *,
    certs: str | None,
    streams: int = 1,
    via: str = "",
    check: bool = True,
    timeout_s: float = 300,
) -> dict:
    """Hello + one full pull; returns seconds and bytes (``via``: dial this address instead)."""
    tls = TlsConfig.for_site(certs, "eu") if certs else None
    with GossipClient(site="eu", run_id=RUN, layout_hash=LAYOUT, tls=tls, insecure=not certs,
                      parallel_streams=streams, timeout_s=timeout_s) as c:  # fmt: skip
        peer = c.hello(via or address, expect_site="us", timeout_s=10)
        if via:
            peer = dataclasses.replace(
                peer, ranks=tuple(RankInfo(r.rank, via, r.lo, r.hi) for r in peer.ranks)
            )
        c.pull(peer, 0, "delta", 0, min(flat, 1024), timeout_s=30)  # warm the connections
        t0 = time.perf_counter()
        res = c.pull(peer, 0, "delta", 0, flat)
        secs = time.perf_counter() - t0
        res.raise_for_error()
        if check:
            assert bytes(res.data) == synthetic(flat, 0).tobytes(), "payload differs"
        return {"seconds": secs, "bytes": res.bytes_recv}


def raw_server(nbytes: int) -> None:
    """Internal: the bare gRPC baseline, a raw-bytes stream of 1 MiB slices, no loco logic."""
    from concurrent import futures

    import grpc

    payload = memoryview(synthetic(nbytes // 4, 0).tobytes())

    def handler(req, ctx):
        for i in range(0, len(payload), 1 << 20):
            yield bytes(payload[i : i + (1 << 20)])

    h = grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=bytes, response_serializer=bytes
    )
    srv = grpc.server(
        futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 8 << 20)]
    )
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", {"Get": h}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print(json.dumps({"addresses": [f"127.0.0.1:{port}"]}), flush=True)
    sys.stdin.read()


def raw_grpc_gbps(nbytes: int, reps: int) -> float:
    import grpc

    cmd = [sys.executable, __file__, "--raw-server", str(nbytes)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    addr = json.loads(proc.stdout.readline())["addresses"][0]
    best = 1e9
    try:
        with grpc.insecure_channel(
            addr, options=[("grpc.max_receive_message_length", 8 << 20)]
        ) as ch:
            get = ch.unary_stream(
                "/bench.Raw/Get", request_serializer=bytes, response_deserializer=bytes
            )
            sum(len(m) for m in get(b"", timeout=60))  # warm
            for _ in range(reps):
                t0 = time.perf_counter()
                n = sum(len(m) for m in get(b"", timeout=300))
                best = min(best, time.perf_counter() - t0)
    finally:
        stop(proc)
    return n / best / 1e9


def memcpy_gbps(nbytes: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def loopback(flat: int, certs: str | None, reps: int) -> float:
    proc, addr = start_peer(flat, certs=certs)
    try:
        best = min(
            pull_once(addr, flat, certs=certs, check=(i == 0))["seconds"] for i in range(reps)
        )
    finally:
        stop(proc)
    return flat * 4 / best / 1e9


def tbf(flat: int, rate_mbit: float) -> dict:
    why = netns_available()
    if why:
        return {"tbf_skipped": why}
    with NetnsLink(rate_mbit=rate_mbit) as link:
        proc, addr = start_peer(
            flat, certs=None, host=link.ip_a, prefix=link.exec_prefix(link.ns_a)
        )
        try:
            out = subprocess.run(
                [*link.exec_prefix(link.ns_b), sys.executable, __file__, "--client", addr,
                 "--flat", str(flat)],
                capture_output=True, text=True, timeout=600, cwd=ROOT,
            )  # fmt: skip
        finally:
            stop(proc)
    if out.returncode:
        return {"tbf_error": out.stderr[-500:]}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mbit = got["bytes"] * 8 / got["seconds"] / 1e6
    return {"tbf_rate_mbit": rate_mbit, "tbf_goodput_mbit": round(mbit, 2),
            "tbf_utilization": round(mbit / rate_mbit, 3)}  # fmt: skip


def proxy(flat: int, rtt_ms: float, rate_mbit: float, streams: int) -> dict:
    proc, addr = start_peer(flat, certs=None)
    out = {"proxy_rtt_ms": rtt_ms, "proxy_rate_mbit": rate_mbit}
    try:
        for n in sorted({1, streams}):
            with DelayProxy(addr, delay_s=rtt_ms / 2000, rate_bps=rate_mbit * 1e6) as px:
                got = pull_once(addr, flat, certs=None, streams=n, via=px.address)
            mbit = got["bytes"] * 8 / got["seconds"] / 1e6
            out[f"proxy_{n}stream_goodput_mbit"] = round(mbit, 2)
            out[f"proxy_{n}stream_utilization"] = round(mbit / rate_mbit, 3)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="loopback payload, MB")
    ap.add_argument("--wan-mb", type=int, default=32, help="payload through emulated WAN, MB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4, help="parallel streams for the proxy run")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["plain", "mtls", "tbf", "proxy"])
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: pull from ADDRESS, print JSON
    ap.add_argument("--flat", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return
    if args.client:
        print(json.dumps(pull_once(args.client, args.flat, certs=None)))
        return
    flat = args.mb * 1_000_000 // 4
    wan_flat = args.wan_mb * 1_000_000 // 4
    res: dict = {
        "bench": "gossip",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "payload_mb": args.mb,
        "memcpy_gbps": round(memcpy_gbps(flat * 4), 2),
    }
    if "plain" not in args.skip:
        res["raw_grpc_gbps"] = round(raw_grpc_gbps(flat * 4, args.reps), 3)
        g = loopback(flat, None, args.reps)
        res["loopback_plain_gbps"] = round(g, 3)
        res["loopback_plain_vs_raw_grpc"] = round(g / res["raw_grpc_gbps"], 3)
        res["loopback_plain_vs_memcpy"] = round(g / res["memcpy_gbps"], 3)
    if "mtls" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            write_run_certs(d, ["eu", "us"])
            g = loopback(flat, d, args.reps)
        res["loopback_mtls_gbps"] = round(g, 3)
        res["loopback_mtls_vs_memcpy"] = round(g / res["memcpy_gbps"], 3)
    res["wan_payload_mb"] = args.wan_mb
    if "tbf" not in args.skip:
        res.update(tbf(wan_flat, args.rate_mbit))
    if "proxy" not in args.skip:
        res.update(proxy(wan_flat, args.rtt_ms, args.rate_mbit, args.streams))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
