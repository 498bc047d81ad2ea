"""Range pulls between two real sites on loopback: bitwise, long poll, eviction, codecs."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from loco.gossip import GossipMetrics, Segment, rank_range


def _payload(p: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(p).astype(np.float32)


@pytest.mark.parametrize("n_src", [1, 2, 3])
@pytest.mark.parametrize("n_dst", [1, 2, 3])
def test_every_rank_gets_its_range_bitwise(sites, clients, n_src, n_dst):
    p = 1_000_003  # prime: no rank count divides it
    full = _payload(p, n_src * 10 + n_dst)
    src = sites("us", n_src, p, chunk_bytes=256 << 10)
    for s in src.servers:
        s.publish(7, "delta", full[s.lo : s.hi])
    client = clients(site="eu")
    peer = client.hello(src.address, expect_site="us")
    assert peer.nproc == n_src and [r.address for r in peer.ranks] == [
        s.address for s in src.servers
    ]
    for r in range(n_dst):
        lo, hi = rank_range(p, n_dst, r)
        res = client.pull(peer, 7, "delta", lo, hi)
        assert res.ok, res.error
        assert bytes(res.data) == full[lo:hi].tobytes()
        assert res.bytes_recv == (hi - lo) * 4


def test_long_poll_waits_for_publish(sites, clients):
    site = sites("us", 2, 1000)
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    data = _payload(1000, 1)

    def later():
        time.sleep(0.5)
        for s in site.servers:
            s.publish(0, "phi", data[s.lo : s.hi])

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    res = client.pull(peer, 0, "phi", 0, 1000, timeout_s=10)
    assert res.ok and bytes(res.data) == data.tobytes()
    assert 0.4 < time.monotonic() - t0 < 5


def test_evicted_round_has_clear_status(sites, clients):
    site = sites("us", 1, 100)
    for rnd in range(4):
        site.servers[0].publish(rnd, "delta", np.full(100, rnd, np.float32))
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    assert peer.current_round == 3
    res = client.pull(peer, 1, "delta", 0, 100)
    assert not res.ok and res.cause == "evicted" and "keeps [2, 3]" in str(res.error)
    assert client.pull(peer, 2, "delta", 0, 100).ok


@pytest.mark.parametrize("streams", [1, 3])
def test_opaque_segments_are_sent_whole(sites, clients, streams):
    p = 100
    site = sites("us", 2, p)
    blobs = {}
    for s in site.servers:
        blobs[s.rank] = bytes([s.rank + 1]) * (17 + s.rank)
        s.publish(0, "delta", blobs[s.rank], codec="int8-test")
    client = clients(parallel_streams=streams)
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 0, "delta", 40, 60)
    assert res.ok and res.data is None
    assert [(g.lo, g.hi, g.codec, bytes(g.data)) for g in res.segments] == [
        (0, 50, "int8-test", blobs[0]),
        (50, 100, "int8-test", blobs[1]),
    ]


def test_split_raw_segments_and_parallel_streams(sites, clients):
    p = 10_000
    full = _payload(p, 3)
    site = sites("us", 1, p, chunk_bytes=1000)
    cuts = [0, 1234, 5000, 9999, p]
    segs = [Segment.make(a, b, full[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    site.servers[0].publish(0, "delta", segments=segs)
    client = clients(parallel_streams=3)
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 0, "delta", 1000, 9000)
    assert res.ok and bytes(res.data) == full[1000:9000].tobytes()


def test_fetch_state_for_a_joining_site(sites, clients):
    p = 3000
    phi = _payload(p, 4)
    site = sites("us", 3, p)
    for s in site.servers:
        s.publish_state("phi", 42, phi[s.lo : s.hi])
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    res = client.fetch_state(peer, "phi", 0, p)
    assert res.ok and res.round == 42 and bytes(res.data) == phi.tobytes()
    missing = client.fetch_state(peer, "momentum", 0, p)
    assert not missing.ok and missing.cause == "evicted"


def test_metrics_count_bytes_and_seconds(sites, clients):
    p = 50_000
    server_metrics = GossipMetrics()
    site = sites("us", 2, p, metrics=server_metrics)
    for s in site.servers:
        s.publish(0, "delta", _payload(p, 5)[s.lo : s.hi])
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    before = client.metrics.snapshot()
    assert client.pull(peer, 0, "delta", 0, p).ok
    assert not client.pull(peer, 5, "delta", 0, p, timeout_s=0.3).ok
    d = client.metrics.delta(client.metrics.snapshot(), before)
    assert d["bytes_recv"] == p * 4 and d["pulls_ok"] == 1 and d["fail_timeout"] == 1
    rec = client.metrics.record(d)
    assert rec["pull_mb_s"] > 0
    assert server_metrics.snapshot()["bytes_sent"] == p * 4


def test_validate_hook_rejects_and_strikes(sites, clients):
    site = sites("us", 1, 100)
    site.servers[0].publish(0, "delta", np.full(100, np.nan, np.float32))
    client = clients()
    peer = client.hello(site.address, expect_site="us")

    def finite(buf, numel, lo):
        if not np.isfinite(np.frombuffer(buf, np.float32)).all():
            raise ValueError("not finite")

    res = client.pull(peer, 0, "delta", 0, 100, validate=finite)
    assert not res.ok and res.cause == "bad_payload" and "not finite" in str(res.error)
    assert client.metrics.snapshot()["strikes"] == 1


def test_chunk_crc_is_zlib_crc32_of_data():
    from loco.gossip.framing import decode_chunk, encode_data

    data = memoryview(bytes(range(256)) * 5000)
    h, got, crc = decode_chunk(encode_data(data))
    assert h is None and bytes(got) == bytes(data) and crc == zlib.crc32(data)


def test_crc32_combine_matches_zlib():
    import os
    import random

    from loco.gossip.framing import crc32_combine

    rng = random.Random(0)
    for n in [0, 1, 7, 4096, (1 << 20) + 3]:
        a, b = os.urandom(rng.randint(0, 3000)), os.urandom(n)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_sliced_pulls_unaligned_to_the_crc_grid(sites, clients):
    p = 100_000
    full = _payload(p, 8)
    site = sites("us", 1, p, chunk_bytes=4096)
    site.servers[0].publish(0, "delta", full)
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    for lo, hi in [(0, p), (1, 1023), (1023, 1025), (999, 77_777), (p - 1, p)]:
        res = client.pull(peer, 0, "delta", lo, hi)
        assert res.ok and bytes(res.data) == full[lo:hi].tobytes(), (lo, hi)
