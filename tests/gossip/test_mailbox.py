"""Mailbox bounds and long-poll semantics; health service; server shutdown during a long poll."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from loco.gossip import Mailbox, Segment
from loco.gossip._pb import health_pb2, health_pb2_grpc
from loco.gossip.mailbox import RoundEvictedError


def _seg(lo: int, hi: int) -> Segment:
    return Segment.make(lo, hi, np.zeros(hi - lo, np.float32))


def test_keeps_last_rounds_and_refuses_stale_publish():
    box = Mailbox(keep_rounds=2)
    for r in range(3):
        box.publish(r, "delta", [_seg(0, 4)])
    assert box.latest_round == 2
    with pytest.raises(RoundEvictedError, match="keeps"):
        box.wait(0, "delta", 0.0)
    assert box.wait(1, "delta", 0.0) is not None
    with pytest.raises(ValueError, match="older"):
        box.publish(0, "delta", [_seg(0, 4)])
    with pytest.raises(ValueError, match="overlapping"):
        box.publish(3, "phi", [_seg(0, 4), _seg(3, 6)])


def test_segment_checks():
    with pytest.raises(ValueError, match="needs 16 bytes"):
        Segment.make(0, 4, b"123")
    with pytest.raises(ValueError, match="dtype"):
        Segment.make(0, 1, b"1234", dtype="float24")
    s = Segment.make(0, 0, b"", codec="opaque")
    assert s.crc32 == 0 and s.grid == ()


def test_wait_wakes_on_publish_and_on_close():
    box = Mailbox()
    threading.Timer(0.2, lambda: box.publish(5, "delta", [_seg(0, 2)])).start()
    t0 = time.monotonic()
    assert box.wait(5, "delta", 5.0) is not None and time.monotonic() - t0 < 2
    threading.Timer(0.2, box.close).start()
    assert box.wait(6, "delta", 5.0) is None


def test_health_check_and_watch(sites):
    site = sites("us", 1, 10)
    with grpc.insecure_channel(site.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        ok = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="loco.v1.Gossip"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_server_stopping_during_long_poll(sites, clients):
    site = sites("us", 1, 100)
    client = clients(backoff_s=0.05, backoff_max_s=0.1)
    peer = client.hello(site.address, expect_site="us")
    threading.Timer(0.3, site.stop).start()
    t0 = time.monotonic()
    res = client.pull(peer, 0, "delta", 0, 100, timeout_s=1.5)
    assert not res.ok and res.cause in ("unavailable", "timeout")
    assert time.monotonic() - t0 < 3
