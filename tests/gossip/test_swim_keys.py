"""SWIM under mTLS: pairwise datagram keys (loco.gossip.swim_keys), the Swim.Key RPC over real
mTLS servers, and real UDP members that refuse forged and replayed datagrams."""

from __future__ import annotations

import random
import socket
import time

import pytest

from loco.gossip import GossipClient
from loco.gossip._pb import swim_pb2
from loco.gossip.errors import GossipError
from loco.gossip.swim import PING, Message, SwimOptions, Update, encode
from loco.gossip.swim_key_service import fetch_key
from loco.gossip.swim_keys import HEADER, KEY_BYTES, TAG, PairKeys, _mac, key_id
from loco.gossip.swim_membership import SwimMembership
from tests.gossip.conftest import LAYOUT, RUN, tls_for

NAMES = ["asia", "eu", "us"]


def _pair(names=NAMES) -> dict[str, PairKeys]:
    keys = {n: PairKeys(n, names) for n in names}
    for n, k in keys.items():  # what the Swim.Key RPC hands out
        for m in names:
            if m != n:
                keys[m].install(n, k.key_for(m))
    return keys


def _ping(src: str, seq: int = 1) -> Message:
    return Message(PING, src, seq, updates=(Update(src, 0, 7),))


def test_pair_keys_accept_only_authentic_fresh_datagrams():
    keys = _pair()
    eu, us, asia = keys["eu"], keys["us"], keys["asia"]
    data = us.seal("eu", _ping("us"))
    assert len(data) == len(encode(_ping("us"))) + HEADER.size + TAG == 28 + 27
    assert eu.open(data) == _ping("us")
    assert eu.open(data) is None and eu.refused["replay"] == 1
    # sealed for asia: eu holds another key of us (pairwise), so it is no key eu knows
    assert eu.open(us.seal("asia", _ping("us"))) is None and eu.refused["unkeyed"] == 1
    # a member that holds K(us -> asia) cannot forge us towards eu, even with eu's key id
    body = encode(_ping("us"))
    head = HEADER.pack(key_id(us.key_for("eu")), 10**6)
    forged = head + _mac(asia._keys["us"].key, head + body)[:TAG] + body
    assert eu.open(forged) is None and eu.refused["bad_tag"] == 1
    # one flipped bit anywhere: refused, never a crash
    good = us.seal("eu", _ping("us", 2))
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1
        assert eu.open(bytes(bad)) is None
    assert eu.open(good) == _ping("us", 2)


def test_counters_out_of_order_within_the_window_and_not_below_it():
    keys = _pair()
    us, eu = keys["us"], keys["eu"]
    sealed = [us.seal("eu", _ping("us", i)) for i in range(100)]
    assert eu.open(sealed[90]) is not None
    assert eu.open(sealed[60]) is not None  # 30 behind the highest: inside the 64 window
    assert eu.open(sealed[20]) is None and eu.refused["replay"] == 1  # 70 behind: too old
    assert eu.open(sealed[60]) is None and eu.refused["replay"] == 2
    assert all(eu.open(d) is not None for d in sealed[91:])


def test_unknown_senders_restarts_and_hostile_bytes():
    seen = []
    eu = PairKeys("eu", NAMES, on_unkeyed=seen.append)
    us = PairKeys("us", NAMES)
    assert eu.open(us.seal("eu", _ping("us"))) is None and seen == ["us"]
    assert not eu.install("mallory", b"k" * 32) and not eu.install("us", b"short")
    mallory = PairKeys("mallory", ["mallory", "eu"])
    assert eu.open(mallory.seal("eu", _ping("mallory"))) is None
    assert eu.refused["unknown_sender"] == 1 and seen == ["us"]  # never fetched
    eu.install("us", us.key_for("eu"))
    assert eu.open(us.seal("eu", _ping("us"))) is not None
    reborn = PairKeys("us", NAMES)  # a restart: a new secret, counters from 1 again
    assert eu.open(reborn.seal("eu", _ping("us"))) is None and seen == ["us", "us"]
    eu.install("us", reborn.key_for("eu"))
    assert eu.open(reborn.seal("eu", _ping("us"))) is not None
    rng = random.Random(0)
    for _ in range(2000):
        junk = rng.randbytes(rng.randrange(0, 200))
        assert eu.open(junk) is None
    assert sum(eu.refused.values()) >= 2000


def test_key_rpc_answers_members_only_with_their_own_key(sites, certdir):
    keys = PairKeys("us", ["eu", "us"])
    site = sites("us", 1, 16, tls=tls_for(certdir, "us"), members=["eu", "us"])
    site.servers[0].swim_keys = keys.key_for
    eu = GossipClient(site="eu", run_id=RUN, layout_hash=LAYOUT, tls=tls_for(certdir, "eu"))
    asia = GossipClient(site="asia", run_id=RUN, layout_hash=LAYOUT, tls=tls_for(certdir, "asia"))
    try:
        assert fetch_key(eu, site.address, "us", 5.0) == keys.key_for("eu")
        with pytest.raises(GossipError):  # a certificate of the run CA, but no member
            fetch_key(asia, site.address, "us", 5.0)
        site.servers[0].swim_keys = None
        with pytest.raises(GossipError, match="no SWIM keys"):
            fetch_key(eu, site.address, "us", 5.0)
    finally:
        eu.close()
        asia.close()


def _wait(cond, limit_s: float) -> None:
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < limit_s:
        time.sleep(0.02)


def test_mtls_members_over_udp_converge_and_refuse_forged_and_replayed(sites, certdir):
    opts = SwimOptions(period_s=0.1, ack_timeout_s=0.04, suspect_periods=5)
    made = {n: sites(n, 1, 16, tls=tls_for(certdir, n), members=NAMES) for n in NAMES}
    peers = {n: s.address for n, s in made.items()}
    members = {}
    for n in NAMES:
        keys = PairKeys(n, NAMES)
        made[n].servers[0].swim_keys = keys.key_for
        client = GossipClient(site=n, run_id=RUN, layout_hash=LAYOUT, tls=tls_for(certdir, n))
        members[n] = SwimMembership(client=client, site=n, peers=peers, udp_listen=peers[n],
                                    keys=keys, options=opts)  # fmt: skip
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for m in members.values():
            m.start()
        _wait(lambda: all(m.live_sites() == NAMES for m in members.values()), 10)
        assert all(m.live_sites() == NAMES for m in members.values())
        eu = members["eu"].udp
        eu_addr = eu.address
        # forged: the right format and us's key id towards eu, but not us's key
        head = HEADER.pack(key_id(members["us"].udp.auth.key_for("eu")), 2**40)
        body = encode(Message(PING, "us", 1, updates=(Update("asia", 2, 99),)))
        sock.sendto(head + _mac(b"x" * 32, head + body)[:TAG] + body, eu_addr)
        # replayed: an authentic datagram of us, sent twice
        real = members["us"].udp.auth.seal("eu", _ping("us", 5))
        sock.sendto(real, eu_addr)
        sock.sendto(real, eu_addr)
        sock.sendto(b"\0" * 5000, eu_addr)  # over MAX_DATAGRAM
        refused = eu.auth.refused
        _wait(lambda: refused["bad_tag"] >= 1 and refused["replay"] >= 1
              and refused["oversize"] >= 1, 5)  # fmt: skip
        assert (refused["bad_tag"], refused["replay"], refused["oversize"]) == (1, 1, 1)
        time.sleep(3 * opts.period_s)
        assert members["eu"].live_sites() == NAMES  # the forged "asia dead" was never applied
        assert members["eu"].fetcher.counts["fetched"] == 2
    finally:
        sock.close()
        for m in members.values():
            m.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gossip_nodes_under_mtls_run_swim_with_pairwise_keys(certdir):
    from loco.gossip import GossipNode

    ports = {n: _free_port() for n in NAMES}
    peers = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    nodes = [
        GossipNode(
            site=n,
            rank=0,
            nproc=1,
            flat_size=16,
            run_id=RUN,
            layout_hash=LAYOUT,
            listen=peers[n],
            peers=peers,
            cert_dir=str(certdir / "run" / n),
            membership="swim",
            heartbeat_s=0.1,
            hello_timeout_s=2.0,
        )  # fmt: skip
        for n in NAMES
    ]
    try:
        for node in nodes:
            node.start()
        # a member can be seen live through a third one's gossip before its key is fetched
        _wait(lambda: all(node.live_sites() == NAMES and node.membership.fetcher.counts["fetched"] == 2
                          for node in nodes), 10)  # fmt: skip
        assert all(node.live_sites() == NAMES for node in nodes)
        for node in nodes:
            auth = node.membership.udp.auth
            assert isinstance(auth, PairKeys) and node.server.swim_keys == auth.key_for
            assert node.membership.fetcher.counts["fetched"] == 2
        assert nodes[0].peer_info("us").site == "us"  # Hello over mTLS still works on demand
        # swim_bytes: every datagram this member sent + its two Swim.Key calls (request and
        # answer, protobuf bytes), once: the next record holds only what came after
        node = nodes[1]
        node.membership.udp.stop()
        req = swim_pb2.SwimKeyRequest(site=node.site).ByteSize()
        resp = sum(swim_pb2.SwimKeyResponse(site=p, key=bytes(KEY_BYTES)).ByteSize()
                   for p in NAMES if p != node.site)  # fmt: skip
        sent = node.membership.udp.bytes_sent
        assert sent > 0
        assert node.round_metrics()["swim_bytes"] == sent + 2 * req + resp
        assert "swim_bytes" not in node.round_metrics()
    finally:
        for node in nodes:
            node.close()


def test_fetcher_gets_the_key_of_a_member_that_starts_later(certdir):
    from loco.gossip import GossipServer
    from loco.gossip.swim_key_service import KeyFetcher

    port = _free_port()
    eu_keys, us_keys = PairKeys("eu", ["eu", "us"]), PairKeys("us", ["eu", "us"])
    client = GossipClient(site="eu", run_id=RUN, layout_hash=LAYOUT, tls=tls_for(certdir, "eu"))
    fetcher = KeyFetcher(client=client, keys=eu_keys, addresses={"us": f"127.0.0.1:{port}"},
                         timeout_s=2.0, min_interval_s=0.1)  # fmt: skip
    server = GossipServer(site="us", rank=0, nproc=1, flat_size=16, run_id=RUN,
                          layout_hash=LAYOUT, listen=f"127.0.0.1:{port}",
                          tls=tls_for(certdir, "us"), members=["eu", "us"])  # fmt: skip
    server.swim_keys = us_keys.key_for
    try:
        fetcher.start()
        fetcher.want("us")
        fetcher.want("mallory")  # no configured member: never fetched
        _wait(lambda: fetcher.counts["failed"] >= 2, 5)  # retried, once per interval at most
        assert fetcher.counts["failed"] >= 2 and not eu_keys.has_key("us")
        server.start()
        _wait(lambda: eu_keys.has_key("us"), 10)
        assert eu_keys.open(us_keys.seal("eu", _ping("us"))) == _ping("us")
        assert fetcher.counts["fetched"] == 1
    finally:
        fetcher.stop()
        client.close()
        server.stop(grace=0)
