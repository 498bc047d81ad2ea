"""WAN emulation: the delay proxy's RTT and rate, partition/heal, and a tbf netns link."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from loco.gossip import RankInfo
from loco.gossip.netem import DelayProxy, NetnsLink, netns_available
from loco.gossip.peer import synthetic
from tests.gossip.conftest import PeerProcess


def _via(peer, address):
    return dataclasses.replace(
        peer, ranks=tuple(RankInfo(r.rank, address, r.lo, r.hi) for r in peer.ranks)
    )


def test_proxy_adds_rtt_and_limits_rate(sites, clients):
    p = 250_000  # 1 MB
    site = sites("us", 1, p)
    data = np.arange(p, dtype=np.float32)
    site.servers[0].publish(0, "delta", data)
    with DelayProxy(site.address, delay_s=0.05, rate_bps=40e6) as px:
        client = clients()
        t0 = time.monotonic()
        peer = client.hello(px.address, expect_site="us", timeout_s=5)
        assert time.monotonic() - t0 >= 0.1  # at least one round trip of 100 ms
        t0 = time.monotonic()
        res = client.pull(_via(peer, px.address), 0, "delta", 0, p)
        secs = time.monotonic() - t0
    assert res.ok and bytes(res.data) == data.tobytes()
    assert secs >= 1e6 * 8 / 40e6  # 1 MB cannot cross a 40 Mbit/s link faster than 0.2 s


def test_partition_then_heal(sites, clients):
    site = sites("us", 1, 1000)
    site.servers[0].publish(0, "delta", np.ones(1000, np.float32))
    px = DelayProxy(site.address, delay_s=0.0)
    addr = px.start()
    client = clients(backoff_s=0.05, backoff_max_s=0.1)
    peer = _via(client.hello(addr, expect_site="us"), addr)
    assert client.pull(peer, 0, "delta", 0, 1000).ok
    px.stop()  # partition
    res = client.pull(peer, 0, "delta", 0, 1000, timeout_s=0.5)
    assert not res.ok and res.cause == "unavailable"
    healed = DelayProxy(site.address, delay_s=0.0, listen=addr)
    healed.start()
    try:
        res = client.pull(peer, 0, "delta", 0, 1000, timeout_s=5)
        assert res.ok and res.retries >= 0
    finally:
        healed.stop()


@pytest.mark.skipif(bool(netns_available()), reason=netns_available() or "ok")
def test_tbf_link_between_namespaces():
    """Two namespaces, veth + tbf 50 Mbit/s: pull 4 MB across it, bitwise, near the link rate."""
    p = 1_000_000
    with NetnsLink(rate_mbit=50) as link:
        peer = PeerProcess("--site", "us", "--flat-size", str(p), "--insecure", "--insecure-public",
                           "--host", link.ip_a,
                           prefix=link.exec_prefix(link.ns_a))  # fmt: skip
        try:
            script = (
                "import json,sys,time; from loco.gossip import GossipClient; "
                "from loco.gossip.peer import synthetic\n"
                "c = GossipClient(site='eu', run_id='run-test', layout_hash='layout-abc', insecure=True)\n"
                f"peer = c.hello('{peer.addresses[0]}', expect_site='us')\n"
                "t = time.monotonic(); r = c.pull(peer, 0, 'delta', 0, peer.flat_size); "
                "s = time.monotonic() - t\n"
                f"print(json.dumps({{'ok': r.ok, 'same': bytes(r.data) == synthetic({p}, 0).tobytes(), 's': s}}))"
            )
            out = subprocess.run([*link.exec_prefix(link.ns_b), sys.executable, "-c", script],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        finally:
            peer.stop()
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ok"] and got["same"]
    mbit = p * 4 * 8 / got["s"] / 1e6
    assert 30 < mbit <= 52, mbit
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link.ns_a not in ns and link.ns_b not in ns


def test_synthetic_is_reproducible():
    assert synthetic(10, 3).tobytes() == synthetic(10, 3).tobytes()
