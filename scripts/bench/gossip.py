"""Gossip payload throughput: loopback (plaintext, mTLS) and emulated WAN links.

    python scripts/bench/gossip.py [--mb 256] [--wan-mb 32] [--reps 3] [--streams 4]

Prints ONE JSON line. A partner site (``python -m loco.gossip.peer``, 1 rank) serves an fp32
payload; this process pulls it with GossipClient and checks it bitwise. Figures:
  * loopback_{plain,mtls}_gbps: best of --reps pulls of --mb MB on a warm connection into a
    reused receive buffer, interleaved with pulls of a bare gRPC raw-bytes stream of the same
    size (``raw_grpc_gbps``: the plaintext transport ceiling here, no loco logic), plus the
    same-run memcpy rate; ``*_vs_*`` are the ratios;
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
    cmd += (
        ["--certs", os.path.join(certs, "us")] if certs else ["--insecure", "--insecure-public"]
    )  # netns hosts
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("peer did not start")
    return proc, json.loads(line)["addresses"][0]


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


class Puller:
    """Hello + repeated full pulls of the peer's payload into one reused receive buffer."""

    def __init__(
        self, address: str, flat: int, *, certs: str | None, streams: int = 1, via: str = ""
    ):
        tls = TlsConfig.for_site(os.path.join(certs, "eu"), "eu") if certs else None
        self.flat = flat
        self.client = GossipClient(site="eu", run_id=RUN, layout_hash=LAYOUT, tls=tls,
                                   insecure=not certs, parallel_streams=streams, timeout_s=600)  # fmt: skip
        peer = self.client.hello(via or address, expect_site="us", timeout_s=10)
        if via:
            ranks = tuple(RankInfo(r.rank, via, r.lo, r.hi) for r in peer.ranks)
            peer = dataclasses.replace(peer, ranks=ranks)
        self.peer = peer
        self.out = np.empty(flat * 4, np.uint8)

    def pull(self, check: bool = False) -> dict:
        t0 = time.perf_counter()
        res = self.client.pull(self.peer, 0, "delta", 0, self.flat, out=self.out)
        secs = time.perf_counter() - t0
        res.raise_for_error()
        if check:
            assert self.out.tobytes() == synthetic(self.flat, 0).tobytes(), "payload differs"
        return {"seconds": secs, "bytes": res.bytes_recv}

    def close(self) -> None:
        self.client.close()


def pull_once(
    address: str, flat: int, *, certs: str | None = None, streams: int = 1, via: str = ""
) -> dict:
    """One full pull on a fresh connection, checked bitwise (the WAN figures)."""
    p = Puller(address, flat, certs=certs, streams=streams, via=via)
    try:
        return p.pull(check=True)
    finally:
        p.close()


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


class RawPuller:
    """The bare gRPC baseline client: counts the bytes of the raw stream."""

    def __init__(self, nbytes: int) -> None:
        import grpc

        cmd = [sys.executable, __file__, "--raw-server", str(nbytes)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        addr = json.loads(self.proc.stdout.readline())["addresses"][0]
        self.ch = grpc.insecure_channel(
            addr, options=[("grpc.max_receive_message_length", 8 << 20)]
        )
        self.get = self.ch.unary_stream(
            "/bench.Raw/Get", request_serializer=bytes, response_deserializer=bytes
        )

    def pull(self) -> dict:
        t0 = time.perf_counter()
        n = sum(len(m) for m in self.get(b"", timeout=600))
        return {"seconds": time.perf_counter() - t0, "bytes": n}

    def close(self) -> None:
        self.ch.close()
        stop(self.proc)


def memcpy_gbps(nbytes: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def loopback(flat: int, certs: str | None, reps: int) -> dict:
    """Best-of-``reps`` GB/s of ours and of the bare gRPC stream, interleaved, warm connections."""
    proc, addr = start_peer(flat, certs=certs)
    ours, raw = Puller(addr, flat, certs=certs), RawPuller(flat * 4)
    try:
        ours.pull(check=True)  # warm: connection, flow-control windows, receive buffer pages
        raw.pull()
        t_ours, t_raw = [], []
        for _ in range(reps):
            t_raw.append(raw.pull()["seconds"])
            t_ours.append(ours.pull()["seconds"])
    finally:
        ours.close()
        raw.close()
        stop(proc)
    return {"gbps": flat * 4 / min(t_ours) / 1e9, "raw_gbps": flat * 4 / min(t_raw) / 1e9}


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
                got = pull_once(addr, flat, streams=n, via=px.address)
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
        print(json.dumps(pull_once(args.client, args.flat)))
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
        got = loopback(flat, None, args.reps)
        res["loopback_plain_gbps"] = round(got["gbps"], 3)
        res["raw_grpc_gbps"] = round(got["raw_gbps"], 3)
        res["loopback_plain_vs_raw_grpc"] = round(got["gbps"] / got["raw_gbps"], 3)
        res["loopback_plain_vs_memcpy"] = round(got["gbps"] / res["memcpy_gbps"], 3)
    if "mtls" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            write_run_certs(d, ["eu", "us"])
            got = loopback(flat, d, args.reps)
        res["loopback_mtls_gbps"] = round(got["gbps"], 3)
        res["loopback_mtls_vs_raw_grpc_plain"] = round(got["gbps"] / got["raw_gbps"], 3)
        res["loopback_mtls_vs_memcpy"] = round(got["gbps"] / res["memcpy_gbps"], 3)
    res["wan_payload_mb"] = args.wan_mb
    if "tbf" not in args.skip:
        res.update(tbf(wan_flat, args.rate_mbit))
    if "proxy" not in args.skip:
        res.update(proxy(wan_flat, args.rtt_ms, args.rate_mbit, args.streams))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
