"""A small federation of GossipNodes on loopback: rounds of publish / pair / pull."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from loco.gossip import GossipNode
from tests.gossip.conftest import LAYOUT, RUN


def _payload(site: str, rnd: int, p: int) -> np.ndarray:
    return (
        np.random.default_rng([zlib.crc32(site.encode()), rnd])
        .standard_normal(p)
        .astype(np.float32)
    )


@pytest.fixture
def federation():
    nodes: dict[str, list[GossipNode]] = {}

    def make(spec: dict[str, int], p: int, **kw) -> dict[str, list[GossipNode]]:
        for site, n in spec.items():
            nodes[site] = [
                GossipNode(
                    site=site,
                    rank=r,
                    nproc=n,
                    flat_size=p,
                    run_id=RUN,
                    layout_hash=LAYOUT,
                    listen="127.0.0.1:0",
                    peers={},
                    insecure=True,
                    heartbeat_s=0.1,
                    hello_timeout_s=1.0,
                    pull_timeout_s=3.0,
                    **kw,
                )  # fmt: skip
                for r in range(n)
            ]
            for node in nodes[site]:
                node.server.start()
            addrs = [node.server.address for node in nodes[site]]
            for node in nodes[site]:
                node.server.set_rank_addresses(addrs)
        for site, ranks in nodes.items():
            peers = {s: rs[0].server.address for s, rs in nodes.items() if s != site}
            for node in ranks:
                node.peers = peers
                if node.membership is not None:
                    node.membership = type(node.membership)(
                        client=node.client, site=site, peers=peers, heartbeat_s=0.1,
                        dead_after=2, hello_timeout_s=1.0,
                    )  # fmt: skip
        return nodes

    yield make
    for ranks in nodes.values():
        for node in ranks:
            node.close()


def test_rounds_across_three_sites(federation):
    p = 10_007
    nodes = federation({"eu": 2, "us": 3, "asia": 1}, p, seed=11, odd="sit_out")
    for ranks in nodes.values():
        ranks[0].membership.beat()
    for rnd in range(3):
        for site, ranks in nodes.items():
            full = _payload(site, rnd, p)
            for node in ranks:
                node.publish(rnd, "delta", full[node.lo : node.hi])
        live = nodes["eu"][0].live_sites()
        assert live == ["asia", "eu", "us"]
        for ranks in nodes.values():
            for node in ranks:
                for partner in node.partners(rnd, live):
                    res = node.pull(partner, rnd, "delta")
                    assert res.ok, res.error
                    assert bytes(res.data) == _payload(partner, rnd, p)[node.lo : node.hi].tobytes()
        pairs = nodes["eu"][0].partners(rnd, live)
        assert len(pairs) <= 1
        rec = nodes["eu"][1].round_metrics()
        assert rec["bytes_recv"] == 4 * len(pairs) * (nodes["eu"][1].hi - nodes["eu"][1].lo)
        assert rec.get("pulls_failed", 0) == 0 and rec["pull_mb_s"] >= 0


def test_dead_partner_makes_the_round_local(federation):
    p = 1000
    nodes = federation({"eu": 2, "us": 2}, p)
    for node in nodes["us"]:
        node.close()
    res = nodes["eu"][1].pull("us", 0, "delta", timeout_s=0.5)
    assert not res.ok and res.cause == "unavailable"
    assert nodes["eu"][1].metrics.snapshot()["fail_unavailable"] == 1
    m = nodes["eu"][0].membership
    for _ in range(3):
        m.beat()
    assert m.live_sites() == ["eu"] and nodes["eu"][0].partners(0) == []


def test_compressed_payload_validated_by_decode(federation, monkeypatch):
    compress = pytest.importorskip("loco.compress")
    monkeypatch.setenv("LOCO_DISABLE_EXT", "1")
    import torch

    p = 4096
    nodes = federation({"eu": 1, "us": 1}, p)
    x = torch.randn(p)
    blob = compress.encode(x, "int8")
    nodes["us"][0].publish(0, "delta", blob, codec="loco")
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x55
    nodes["us"][0].publish(1, "delta", bytes(bad), codec="loco")

    def check(buf, numel, lo):
        assert compress.decode(bytes(buf), max_numel=numel).numel() == numel

    node = nodes["eu"][0]
    ok = node.pull("us", 0, "delta", validate=check)
    assert ok.ok and len(ok.segments) == 1
    torch.testing.assert_close(compress.decode(bytes(ok.segments[0].data)), compress.decode(blob))
    res = node.pull("us", 1, "delta", validate=check)
    assert not res.ok and res.cause == "bad_payload" and "PayloadError" in str(res.error)


def test_nodes_over_mtls(certdir):
    p = 5000
    run = certdir / "run"
    eu = GossipNode(site="eu", rank=0, nproc=1, flat_size=p, run_id=RUN, layout_hash=LAYOUT,
                    listen="127.0.0.1:0", peers={}, cert_dir=str(run / "eu"), heartbeat=False)  # fmt: skip
    us = [
        GossipNode(
            site="us",
            rank=r,
            nproc=2,
            flat_size=p,
            run_id=RUN,
            layout_hash=LAYOUT,
            listen="127.0.0.1:0",
            peers={"eu": "127.0.0.1:1"},
            cert_dir=str(run / "us"),
            heartbeat=False,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        for n in [eu, *us]:
            n.start()
        addrs = [n.server.address for n in us]
        us[0].server.set_rank_addresses(addrs)
        eu.peers = {"us": addrs[0], "asia": addrs[0]}
        res = eu.pull("asia", 0, "phi")  # us's certificate does not say "asia"
        assert not res.ok and res.cause == "auth"
        full = _payload("us", 0, p)
        for n in us:
            n.publish(0, "phi", full[n.lo : n.hi])
        res = eu.pull("us", 0, "phi")
        assert res.ok and bytes(res.data) == full.tobytes()
        assert eu.server.tls is not None and eu.client.tls is not None
    finally:
        for n in [eu, *us]:
            n.close()
