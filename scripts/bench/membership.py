"""Membership bytes per site per beat: SWIM over UDP vs the all-to-all Hello heartbeat.

    python scripts/bench/membership.py [--sizes 4,8,16,32] [--period 0.2] [--beats 25]
                                       [--auth run,pair]

Prints ONE JSON line. For each N and each datagram authentication (``run``: the run key of
insecure runs, 16 bytes a datagram; ``pair``: the pairwise site keys of mTLS runs, 28 bytes, the
keys installed as the Swim.Key RPC hands them out), N real SWIM members
(loco.gossip.swim_udp.UdpSwim: one UDP socket and one thread each, all in this process, on
loopback) run for ``--beats`` periods; ``swim_bytes_per_beat`` is the datagram bytes a member
sent per period (UDP/IP headers not counted). ``key_rpc_bytes``: the protobuf bytes of one real
Swim.Key call over mTLS, paid once per peer and life under ``pair``. Then one member is stopped and ``detect_s`` is the time until
every survivor's view has dropped it. The reference, measured in the same run: one real
GossipServer answers a Hello; ``hello_bytes`` is the protobuf request + response as sent (HTTP/2
and TLS framing not counted, so the all-to-all figure is a lower bound) and the all-to-all
heartbeat costs ``(N - 1) * hello_bytes`` per site per beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loco.gossip import GossipServer  # noqa: E402
from loco.gossip._pb import gossip_pb2 as pb  # noqa: E402
from loco.gossip.client import PROTOCOL_VERSION, SERVICE  # noqa: E402
from loco.gossip.swim import SwimOptions  # noqa: E402
from loco.gossip.swim_keys import PairKeys, RunKey  # noqa: E402
from loco.gossip.swim_udp import UdpSwim  # noqa: E402

RUN, LAYOUT = "run-bench", "layout-bench"


def hello_bytes() -> int:
    """Request + response protobuf bytes of one Hello to a real server (site name ``s10``)."""
    server = GossipServer(site="s10", rank=0, nproc=1, flat_size=1 << 20, run_id=RUN,
                          layout_hash=LAYOUT, insecure=True)  # fmt: skip
    server.start()
    got = {}

    def deserialize(raw: bytes) -> pb.HelloResponse:
        got["resp"] = len(raw)
        return pb.HelloResponse.FromString(raw)

    req = pb.HelloRequest(run_id=RUN, protocol_version=PROTOCOL_VERSION, layout_hash=LAYOUT,
                          site="s11")  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                  response_deserializer=deserialize)  # fmt: skip
            call(req, timeout=10)
    finally:
        server.stop(grace=0)
    return req.ByteSize() + got["resp"]


def key_rpc_bytes() -> int:
    """Request + response protobuf bytes of one Swim.Key call between two mTLS sites."""
    from loco.certs import write_run_certs
    from loco.gossip import GossipClient, TlsConfig
    from loco.gossip._pb import swim_pb2
    from loco.gossip.swim_key_service import fetch_key

    with tempfile.TemporaryDirectory() as d:
        write_run_certs(d, ["s10", "s11"])
        tls = {s: TlsConfig.for_site(Path(d) / s, s) for s in ("s10", "s11")}
    server = GossipServer(site="s10", rank=0, nproc=1, flat_size=1 << 20, run_id=RUN,
                          layout_hash=LAYOUT, tls=tls["s10"], members=["s10", "s11"])  # fmt: skip
    server.swim_keys = PairKeys("s10", ["s10", "s11"]).key_for
    server.start()
    client = GossipClient(site="s11", run_id=RUN, layout_hash=LAYOUT, tls=tls["s11"])
    try:
        key = fetch_key(client, server.address, "s10", 10.0)
    finally:
        client.close()
        server.stop(grace=0)
    req = swim_pb2.SwimKeyRequest(site="s11")
    return req.ByteSize() + swim_pb2.SwimKeyResponse(site="s10", key=key).ByteSize()


def authenticators(names: list[str], auth: str) -> list[RunKey | PairKeys]:
    if auth == "run":
        return [RunKey(b"bench-key-0123456789abcdef") for _ in names]
    keys = [PairKeys(n, names) for n in names]
    for k in keys:
        for other in keys:
            if other is not k:
                other.install(k.site, k.key_for(other.site))
    return keys


def swim_run(n: int, period: float, beats: int, auth: str) -> dict:
    opts = SwimOptions(period_s=period, ack_timeout_s=0.3 * period, suspect_periods=4)
    names = [f"s{i}" for i in range(n)]
    members = [
        UdpSwim(site=name, address=("127.0.0.1", 0), book={}, auth=a, options=opts, seed=i)
        for i, (name, a) in enumerate(zip(names, authenticators(names, auth), strict=True))
    ]
    book = {f"s{i}": m.address for i, m in enumerate(members)}
    for m in members:
        m.meet(book)
        m.start()
    try:
        time.sleep(3 * period)  # start-up announcements out of the way
        before = [m.bytes_sent for m in members]
        time.sleep(beats * period)
        steady = [(m.bytes_sent - b) / beats for m, b in zip(members, before, strict=True)]
        converged = all(m.live() == sorted(book) for m in members)
        victim = members[-1]
        victim.stop()
        t0 = time.monotonic()
        before = [m.bytes_sent for m in members[:-1]]
        while any(victim.swim.site in m.live() for m in members[:-1]):
            if time.monotonic() - t0 > 60 * period + 10:
                break
            time.sleep(period / 10)
        detect = time.monotonic() - t0
        elapsed = max(detect / period, 1e-9)
        failing = [(m.bytes_sent - b) / elapsed for m, b in zip(members[:-1], before, strict=True)]
    finally:
        for m in members[:-1]:
            m.stop()
    return {
        "n": n,
        "auth": auth,
        "converged": converged,
        "swim_bytes_per_beat": round(sum(steady) / n, 1),
        "swim_bytes_per_beat_max": round(max(steady), 1),
        "swim_bytes_per_beat_while_detecting": round(sum(failing) / len(failing), 1),
        "detect_s": round(detect, 2),
        "detect_periods": round(detect / period, 1),
        "rejected": sum(m.rejected for m in members),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,32")
    ap.add_argument("--period", type=float, default=0.2)
    ap.add_argument("--beats", type=int, default=25)
    ap.add_argument("--auth", default="run,pair")
    a = ap.parse_args()
    auths = a.auth.split(",")
    if not set(auths) <= {"run", "pair"}:
        raise SystemExit(f"--auth={a.auth}: a comma list of run and pair")
    hb = hello_bytes()
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        for auth in auths:
            row = swim_run(n, a.period, a.beats, auth)
            row["all_to_all_bytes_per_beat"] = (n - 1) * hb
            row["all_to_all_vs_swim"] = round(
                row["all_to_all_bytes_per_beat"] / row["swim_bytes_per_beat"], 2
            )
            rows.append(row)
    print(json.dumps({"bench": "membership", "period_s": a.period, "beats": a.beats,
                      "hello_bytes": hb, "key_rpc_bytes": key_rpc_bytes() if "pair" in auths else None,
                      "sizes": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
