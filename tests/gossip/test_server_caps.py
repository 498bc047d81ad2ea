"""Server stream caps and authorised health, on real mTLS servers on loopback.

A member's streams (long-poll Pulls, Health.Watch) must never starve another member's Hello;
a peer over its cap is refused at once (RESOURCE_EXHAUSTED -> PeerBusy, cause "busy"); a
non-member certificate of the run CA is refused on Health like on every other RPC.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from loco.certs import write_run_certs
from loco.gossip import GossipClient, GossipServer, TlsConfig
from loco.gossip._pb import gossip_pb2 as pb
from loco.gossip._pb import health_pb2, health_pb2_grpc
from loco.gossip.errors import PeerBusy
from loco.gossip.framing import identity
from loco.gossip.server import SERVICE, peer_host
from loco.gossip.tls import channel_credentials

RUN, LAYOUT, P = "run-caps", "layout-caps", 1000
MEMBERS = ["eu", "us", "asia"]
NEVER = 99  # a round nobody publishes: a Pull of it is a long poll


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """One run CA; mallory holds a certificate of it but is not a member."""
    d = tmp_path_factory.mktemp("caps-certs")
    write_run_certs(d, [*MEMBERS, "mallory"])
    return d


@pytest.fixture
def env(certs):
    """``server(**kw)`` (site eu, started), ``channel(site, server)``, ``client(site)``;
    everything is closed at the end."""
    made: list = []

    def server(**kw) -> GossipServer:
        s = GossipServer(site="eu", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                         tls=TlsConfig.for_site(certs / "eu", "eu"), members=MEMBERS, **kw)  # fmt: skip
        s.start()
        made.append(s.stop)
        return s

    def channel(site: str, srv: GossipServer) -> grpc.Channel:
        creds = channel_credentials(TlsConfig.for_site(certs / site, site))
        ch = grpc.secure_channel(srv.address, creds, [("grpc.ssl_target_name_override", "eu")])
        made.append(ch.close)
        return ch

    def client(site: str, **kw) -> GossipClient:
        kw.setdefault("backoff_s", 0.05)
        kw.setdefault("backoff_max_s", 0.1)
        c = GossipClient(site=site, run_id=RUN, layout_hash=LAYOUT,
                         tls=TlsConfig.for_site(certs / site, site), **kw)  # fmt: skip
        made.append(c.close)
        return c

    yield server, channel, client
    for close in reversed(made):
        close()


def _pull_call(ch: grpc.Channel, round: int = NEVER, timeout: float = 60.0):
    """Start a Pull of the whole range (the call is under way once this returns)."""
    rpc = ch.unary_stream(f"/{SERVICE}/Pull", request_serializer=pb.PullRequest.SerializeToString,
                          response_deserializer=identity)  # fmt: skip
    req = pb.PullRequest(run_id=RUN, layout_hash=LAYOUT, round=round, stream="delta", lo=0, hi=P)
    return rpc(req, timeout=timeout)


def _wait_held(srv: GossipServer, n: int, peer: str | None = None, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while srv.slots.held(peer) != n:
        assert time.monotonic() < end, f"server holds {srv.slots.held(peer)} streams, not {n}"
        time.sleep(0.02)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_hello_answers_while_a_member_holds_more_long_polls_than_the_old_pool(env):
    server, channel, client = env
    srv = server()  # default caps
    us = channel("us", srv)
    held = [_pull_call(us) for _ in range(40)]  # the old server had 32 workers for everything
    _wait_held(srv, 40, "us")
    t0 = time.monotonic()
    info = client("asia").hello(srv.address, expect_site="eu", timeout_s=2.0)
    assert info.site == "eu" and time.monotonic() - t0 < 2.0
    stub = health_pb2_grpc.HealthStub(channel("asia", srv))
    ok = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    for c in held:
        c.cancel()
    _wait_held(srv, 0)


def test_unary_rpcs_answer_when_every_stream_slot_is_held(env):
    server, channel, client = env
    srv = server(max_streams=4, max_streams_per_peer=4)
    held = [_pull_call(channel("us", srv)) for _ in range(4)]
    _wait_held(srv, 4)
    asia = channel("asia", srv)
    t0 = time.monotonic()
    extra = [_pull_call(asia, timeout=5.0) for _ in range(12)]  # all over the total cap
    for c in extra:
        assert _code(lambda c=c: next(c)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 3.0, "refusals must be immediate, not queued"
    assert srv.metrics.snapshot()["served_fail_busy"] == 12
    assert client("asia").hello(srv.address, expect_site="eu", timeout_s=2.0).site == "eu"
    for c in held:
        c.cancel()
    _wait_held(srv, 0)


def test_per_peer_cap_refuses_with_peer_busy_while_another_peer_pulls(env):
    server, channel, client = env
    srv = server(max_streams=16, max_streams_per_peer=3)
    data = np.arange(P, dtype=np.float32)
    srv.publish(0, "delta", data)
    held = [_pull_call(channel("us", srv)) for _ in range(3)]
    _wait_held(srv, 3, "us")
    us = client("us", max_retries=3)
    peer = us.hello(srv.address, expect_site="eu")
    res = us.pull(peer, 0, "delta", 0, P, timeout_s=5.0)
    assert not res.ok and res.cause == "busy" and isinstance(res.error, PeerBusy), res.error
    assert res.retries == 3  # busy is retried with backoff, then given up
    asia = client("asia")
    got = asia.pull(asia.hello(srv.address, expect_site="eu"), 0, "delta", 0, P, timeout_s=5.0)
    assert got.ok and bytes(got.data) == data.tobytes()
    assert srv.metrics.snapshot()["served_fail_busy"] == 4
    for c in held:  # the slots come back when the streams end
        c.cancel()
    _wait_held(srv, 0, "us")
    assert us.pull(peer, 0, "delta", 0, P, timeout_s=5.0).ok


def test_non_member_certificate_is_refused_on_health_check_and_watch(env):
    server, channel, _ = env
    srv = server()
    stub = health_pb2_grpc.HealthStub(channel("mallory", srv))
    req = health_pb2.HealthCheckRequest(service="")
    assert _code(lambda: stub.Check(req, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    watch = stub.Watch(req, timeout=5)
    assert _code(lambda: next(watch)) == grpc.StatusCode.PERMISSION_DENIED
    assert srv.metrics.snapshot()["served_fail_auth"] == 2
    assert srv.slots.held() == 0
    member = health_pb2_grpc.HealthStub(channel("us", srv))
    assert member.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_watch_counts_against_the_caps_and_ends_by_itself(env):
    server, channel, _ = env
    srv = server(max_wait_s=1.0, max_streams=2, max_streams_per_peer=2)
    stub = health_pb2_grpc.HealthStub(channel("us", srv))
    req = health_pb2.HealthCheckRequest(service=SERVICE)
    t0 = time.monotonic()
    watches = [stub.Watch(req, timeout=30) for _ in range(2)]
    for w in watches:
        assert next(w).status == health_pb2.HealthCheckResponse.SERVING
    _wait_held(srv, 2)
    third = stub.Watch(req, timeout=30)
    assert _code(lambda: next(third)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for w in watches:
        assert list(w) == []  # ends OK after max_wait_s, long before the caller's deadline
        assert w.code() == grpc.StatusCode.OK
    assert time.monotonic() - t0 < 5.0
    _wait_held(srv, 0)


def test_peer_host_of_grpc_peer_strings():
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "[::1]"
    assert peer_host("unix:/tmp/sock") == "/tmp/sock"


def test_config_keys_reach_the_server():
    from loco.build import gossip_kwargs
    from loco.config import compose
    from loco.gossip import GossipNode

    cfg = compose(["+site=eu", "gossip.insecure=true", "gossip.max_streams=7",
                   "gossip.max_streams_per_peer=3"])  # fmt: skip
    node = GossipNode(rank=0, nproc=1, flat_size=P, layout_hash=LAYOUT, **gossip_kwargs(cfg))
    try:
        assert (node.server.slots.total, node.server.slots.per_peer) == (7, 3)
    finally:
        node.client.close()


def test_plaintext_peers_are_capped_per_host():
    srv = GossipServer(site="eu", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                       insecure=True, max_streams=8, max_streams_per_peer=2)  # fmt: skip
    srv.start()
    chans = [grpc.insecure_channel(srv.address) for _ in range(3)]  # three "sites", one host
    try:
        held = [_pull_call(ch) for ch in chans[:2]]
        _wait_held(srv, 2, "127.0.0.1")
        assert _code(lambda: next(_pull_call(chans[2], timeout=5))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        for c in held:
            c.cancel()
    finally:
        for ch in chans:
            ch.close()
        srv.stop(grace=0)
