"""Fault drills: each failure gives the right typed status, and the caller's round goes on."""

from __future__ import annotations

import time

import numpy as np
import pytest

from loco.gossip import (
    GossipError,
    PeerInfo,
    PeerMismatch,
    PeerUnavailable,
    RankInfo,
)
from loco.gossip.peer import synthetic
from loco.testing.gossip_faults import ServerFault
from tests.gossip.conftest import LAYOUT, RUN, free_port


def _healthy_pull_still_works(sites, client) -> None:
    """The caller's next round goes on: another peer is pulled fine by the same client."""
    ok = sites("asia", 1, 64)
    ok.servers[0].publish(0, "delta", np.arange(64, dtype=np.float32))
    peer = client.hello(ok.address, expect_site="asia")
    res = client.pull(peer, 0, "delta", 0, 64)
    assert res.ok and bytes(res.data) == np.arange(64, dtype=np.float32).tobytes()


@pytest.mark.timeout(60)
def test_partner_killed_mid_stream(peer_process, clients, sites):
    p = 2_000_000  # 8 MB; the peer exits after 3 chunks of 64 KiB
    proc = peer_process(
        "--site", "us", "--nproc", "2", "--flat-size", str(p), "--insecure",
        "--chunk-bytes", str(64 << 10), "--exit-after-chunks", "3",
    )  # fmt: skip
    client = clients(backoff_s=0.05, backoff_max_s=0.2)
    peer = client.hello(proc.addresses[0], expect_site="us")
    t0 = time.monotonic()
    res = client.pull(peer, 0, "delta", 0, p, timeout_s=3.0)
    assert not res.ok and res.cause == "unavailable", res.error
    assert isinstance(res.error, PeerUnavailable) and res.data is None
    assert time.monotonic() - t0 < 5.0
    assert proc.proc.wait(timeout=5) == 1  # it really died mid-stream
    snap = client.metrics.snapshot()
    assert snap["fail_unavailable"] == 1 and snap["retries"] >= 1
    with pytest.raises(GossipError):
        res.raise_for_error()
    _healthy_pull_still_works(sites, client)


def test_partner_healthy_process_bitwise(peer_process, clients):
    p = 300_001
    proc = peer_process(
        "--site", "us", "--nproc", "3", "--flat-size", str(p), "--insecure", "--seed", "9"
    )
    client = clients()
    peer = client.hello(proc.addresses[0], expect_site="us")
    res = client.pull(peer, 0, "delta", 1000, p - 5)
    assert res.ok and bytes(res.data) == synthetic(p, 9)[1000 : p - 5].tobytes()


def test_retries_are_bounded(clients):
    addr = f"127.0.0.1:{free_port()}"
    client = clients(backoff_s=0.01, backoff_max_s=0.02, max_retries=3)
    ghost = PeerInfo("us", RUN, LAYOUT, 1, 1, 100, (RankInfo(0, addr, 0, 100),), -1)
    t0 = time.monotonic()
    res = client.pull(ghost, 0, "delta", 0, 100, timeout_s=30)
    assert not res.ok and res.cause == "unavailable" and res.retries == 3
    assert time.monotonic() - t0 < 5


def test_partner_never_started(clients, sites):
    addr = f"127.0.0.1:{free_port()}"
    client = clients(backoff_s=0.05, backoff_max_s=0.2)
    with pytest.raises(PeerUnavailable):
        client.hello(addr, expect_site="us", timeout_s=1.0)
    ghost = PeerInfo("us", RUN, LAYOUT, 1, 1, 100, (RankInfo(0, addr, 0, 100),), -1)
    t0 = time.monotonic()
    res = client.pull(ghost, 0, "delta", 0, 100, timeout_s=1.0)
    assert not res.ok and res.cause == "unavailable" and res.retries >= 1
    assert time.monotonic() - t0 < 2.5
    _healthy_pull_still_works(sites, client)


def test_partner_slower_than_deadline(sites, clients):
    slow = sites("us", 1, 100, fault=ServerFault(delay_s=2.0))
    slow.servers[0].publish(0, "delta", np.zeros(100, np.float32))
    client = clients()
    peer = client.hello(slow.address, expect_site="us")
    t0 = time.monotonic()
    res = client.pull(peer, 0, "delta", 0, 100, timeout_s=0.5)
    assert not res.ok and res.cause == "timeout"
    assert time.monotonic() - t0 < 1.5
    _healthy_pull_still_works(sites, client)


def test_round_never_published_times_out(sites, clients):
    site = sites("us", 2, 100)
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 5, "delta", 0, 100, timeout_s=0.5)
    assert not res.ok and res.cause == "timeout"


@pytest.mark.parametrize("field", ["run_id", "layout_hash"])
def test_wrong_run_or_layout(sites, clients, field):
    site = sites("us", 1, 100)
    site.servers[0].publish(0, "delta", np.zeros(100, np.float32))
    good = clients().hello(site.address, expect_site="us")
    client = clients(**{field: "other"})
    with pytest.raises(PeerMismatch, match=field):
        client.hello(site.address, expect_site="us")
    res = client.pull(good, 0, "delta", 0, 100)  # server refuses: FAILED_PRECONDITION
    assert not res.ok and res.cause == "mismatch" and "FAILED_PRECONDITION" in str(res.error)


def test_wrong_site_name_in_hello(sites, clients):
    site = sites("us", 1, 100)
    with pytest.raises(PeerMismatch, match="site"):
        clients().hello(site.address, expect_site="asia")


def test_corrupted_chunk_strikes_then_ban(sites, clients):
    bad = sites("us", 1, 100_000, chunk_bytes=64 << 10, fault=ServerFault(corrupt_chunk=1))
    for rnd in range(2):
        bad.servers[0].publish(rnd, "delta", np.ones(100_000, np.float32))
    client = clients(strikes=2, ban_rounds=3)
    peer = client.hello(bad.address, expect_site="us")
    for rnd in (0, 1):
        res = client.pull(peer, rnd, "delta", 0, 100_000)
        assert not res.ok and res.cause == "bad_payload" and "checksum" in str(res.error)
    res = client.pull(peer, 2, "delta", 0, 100_000)
    assert not res.ok and res.cause == "banned" and res.seconds < 0.1
    assert client.is_banned("us", 4) and not client.is_banned("us", 5)
    snap = client.metrics.snapshot()
    assert snap["strikes"] == 2 and snap["bans"] == 1 and snap["fail_banned"] == 1
    _healthy_pull_still_works(sites, client)


@pytest.mark.parametrize(
    "header", [{"round": 99}, {"run_id": "evil"}, {"lo": 3}, {"length": 12}, {"crc32": 1}]
)
def test_lying_header_is_bad_payload(sites, clients, header):
    site = sites("us", 1, 100, fault=ServerFault(header=header))
    site.servers[0].publish(0, "delta", np.ones(100, np.float32))
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 0, "delta", 0, 100)
    assert not res.ok and res.cause == "bad_payload", res.error


def test_bad_requests(sites, clients):
    site = sites("us", 1, 100)
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    assert client.pull(peer, 0, "delta", 50, 200).cause == "bad_request"
    assert client.pull(peer, 0, "delta", 0, 10, dtype="complex").cause == "bad_request"


def test_broken_stream_resumes_where_it_stopped(sites, clients):
    p = 1_000_000
    data = synthetic(p, 2)
    site = sites("us", 1, p, chunk_bytes=64 << 10, fault=ServerFault(unavailable_once_after=10))
    site.servers[0].publish(0, "delta", data)
    client = clients(backoff_s=0.01)
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 0, "delta", 12_345, p)
    assert res.ok and bytes(res.data) == data[12_345:].tobytes()
    assert res.retries == 1
    # the retry asked only for what was missing: no byte was received twice
    assert res.bytes_recv == (p - 12_345) * 4
