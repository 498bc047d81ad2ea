"""The pairing agreement on real gossip servers: proposals exchanged over the Proposal RPC,
settled groups, and the gate that refuses a round's payload to a site outside the group."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from loco.gossip import GossipNode
from loco.gossip._pb import gossip_pb2 as pb
from loco.gossip.agree_rpc import (
    KEEP_ROUNDS,
    MAX_PROPOSAL_BYTES,
    ProposalBook,
    agree,
    fetch_proposal,
)
from loco.gossip.agreement import MAX_NAME, Proposal
from loco.gossip.counters import GossipMetrics
from loco.gossip.health import SERVICE

from .conftest import LAYOUT, RUN, free_port, tls_for

P = 1000


def _node(name: str, ports: dict[str, int], **kw) -> GossipNode:
    kw.setdefault("insecure", True)
    return GossipNode(
        site=name, rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
        listen=f"127.0.0.1:{ports[name]}", heartbeat=False, pull_timeout_s=3.0,
        hello_timeout_s=1.0, max_retries=1, backoff_s=0.05,
        peers={n: f"127.0.0.1:{p}" for n, p in ports.items() if n != name}, **kw,
    ).start()  # fmt: skip


@pytest.fixture
def trio():
    ports = {n: free_port() for n in ("as", "eu", "us")}
    nodes = {n: _node(n, ports) for n in ports}
    yield nodes
    for n in nodes.values():
        n.close()


def _agree_all(nodes: dict[str, GossipNode], t: int, views: dict[str, list[str]]):
    with ThreadPoolExecutor(len(views)) as pool:
        jobs = {s: pool.submit(nodes[s].agree, t, v, 1.5) for s, v in views.items()}
        return {s: j.result() for s, j in jobs.items()}


def test_agreeing_views_settle_the_pair_and_a_third_site_gets_not_agreed(trio):
    """eu and us see {eu, us}: the roster's one triple less the dead as is the pair, which
    they settle. as, outside the group, asks eu for round 1's delta: ABORTED -> not_agreed,
    counted by eu's server, while us pulls the same range fine."""
    eu, us, as_ = trio["eu"], trio["us"], trio["as"]
    for n in (eu, us):
        n.require_agreement(exempt=("final",))
    got = _agree_all(trio, 1, {"eu": ["eu", "us"], "us": ["eu", "us"]})
    assert got["eu"].group == got["us"].group == ("eu", "us")
    assert got["eu"].causes == {} and got["eu"].partners == ["us"]
    for s in ("eu", "us"):
        trio[s].settle(1, got[s].group)
    payload = np.arange(P, dtype=np.float32)
    eu.publish(1, "delta", payload)
    res = as_.pull("eu", 1, "delta")
    assert not res.ok and res.cause == "not_agreed", res.error
    assert "not_agreed" in str(res.error)
    res = us.pull("eu", 1, "delta")
    assert res.ok and bytes(res.data) == payload.tobytes()
    served = eu.server.metrics.snapshot()
    assert served.get("served_fail_not_agreed") == 1 and served.get("served_pulls") == 1
    # an exempt stream (the final average's) is served to any member
    eu.publish(1, "final", payload)
    assert as_.pull("eu", 1, "final").ok
    # the exchange's cost: two small messages per fetched proposal, counted
    m = eu.metrics.snapshot()
    assert 0 < m["agree_bytes"] < 200 and m["agree_rounds"] == 1


def test_disagreeing_views_both_step_alone(trio):
    """eu sees as live, us does not: eu proposes the triple, us the pair; neither keeps it."""
    eu, us = trio["eu"], trio["us"]
    got = _agree_all(trio, 2, {"eu": ["as", "eu", "us"], "us": ["eu", "us"]})
    assert got["eu"].proposal.group == ("as", "eu", "us")  # as is reachable but never proposed
    assert got["us"].proposal.group == ("eu", "us")
    assert got["eu"].group == ("eu",) and got["us"].group == ("us",)
    assert got["us"].causes == {"eu": "not_agreed"}
    assert got["eu"].causes["us"] == "not_agreed"
    assert eu.metrics.snapshot()["agree_alone"] == 1 and us.metrics.snapshot()["agree_alone"] == 1


def test_pull_before_settle_waits_for_it(trio):
    eu, us = trio["eu"], trio["us"]
    eu.require_agreement()
    payload = np.ones(P, np.float32)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("res", us.pull("eu", 3, "phi")))
    th.start()
    time.sleep(0.5)
    assert "res" not in out  # waiting for eu's settle
    eu.settle(3, ("eu", "us"))
    eu.publish(3, "phi", payload)
    th.join(10)
    assert out["res"].ok


def test_settle_window_is_bounded():
    book = ProposalBook(metrics=GossipMetrics(), max_wait_s=1.0)
    for t in range(100):
        book.settle(t, ("eu", "us"))
        book.propose(Proposal("eu", t, ("eu", "us")))
    assert len(book._settled) == len(book._proposals) == KEEP_ROUNDS
    assert book.settled(99) == ("eu", "us") and book.settled(99 - KEEP_ROUNDS) is None


def test_unreachable_member_is_a_bounded_disagreement(trio):
    eu = trio["eu"]
    trio["us"].close()
    t0 = time.monotonic()
    got = eu.agree(1, ["eu", "us"], timeout_s=1.0)
    assert got.group == ("eu",) and got.causes["us"] in ("unavailable", "timeout")
    assert time.monotonic() - t0 < 3.0


class HostileProposals:
    """A gRPC server whose Proposal RPC answers ``answer(request)`` raw bytes."""

    def __init__(self, answer) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(
            lambda req, ctx: answer(req), request_deserializer=pb.ProposalRequest.FromString,
            response_serializer=lambda b: b,
        )  # fmt: skip
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Proposal": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def _resp(site="us", round=1, group=("eu", "us")) -> bytes:
    return pb.ProposalResponse(site=site, round=round, group=list(group)).SerializeToString()


HOSTILE = {
    "oversized": lambda r: _resp() + b"\x1a\x02zz" * 400,  # > MAX_PROPOSAL_BYTES
    "undecodable": lambda r: b"\xff\xff\xff\xff",
    "four_names": lambda r: _resp(group=("a", "b", "eu", "us")),
    "other_site": lambda r: _resp(site="as", group=("as", "eu")),
    "other_round": lambda r: _resp(round=r.round + 1),
    "long_name": lambda r: _resp(group=("eu", "u" * (MAX_NAME + 1))),
    "unsorted": lambda r: _resp(group=("us", "eu")),
    "duplicate": lambda r: _resp(group=("eu", "us", "us")),
    "empty": lambda r: b"",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_proposal_is_a_disagreement_never_a_crash(kind, clients):
    assert len(HOSTILE["oversized"](pb.ProposalRequest(round=1))) > MAX_PROPOSAL_BYTES
    evil = HostileProposals(HOSTILE[kind])
    client = clients(site="eu")
    book = ProposalBook(metrics=client.metrics, max_wait_s=1.0)
    try:
        with pytest.raises(Exception) as err:
            fetch_proposal(client, f"127.0.0.1:{evil.port}", "us", 1, 2.0)
        assert getattr(err.value, "cause", None) == "bad_payload", err.value
        with ThreadPoolExecutor(2) as pool:
            got = agree(client=client, book=book, site="eu", round=1, view=["eu", "us"],
                        roster=["eu", "us"], seed=0, odd="triple", timeout_s=2.0, pool=pool,
                        address_of=lambda s: f"127.0.0.1:{evil.port}")  # fmt: skip
        assert got.proposal.group == ("eu", "us")
        assert got.group == ("eu",) and got.causes == {"us": "bad_payload"}
    finally:
        evil.stop()


def test_identity_is_the_certificate_under_mtls(certdir):
    """Under mTLS the gate checks the certificate's name, not the request's claim: asia, with
    its own certificate, claiming to be us, is refused; us is served."""
    ports = {n: free_port() for n in ("asia", "eu", "us")}
    nodes = {
        n: _node(n, ports, insecure=False, tls=tls_for(certdir, n)) for n in ports
    }  # fmt: skip
    try:
        eu = nodes["eu"]
        eu.require_agreement()
        eu.settle(1, ("eu", "us"))
        eu.publish(1, "delta", np.zeros(P, np.float32))
        nodes["asia"].client.site = "us"  # the claim in the request
        res = nodes["asia"].pull("eu", 1, "delta")
        assert not res.ok and res.cause == "not_agreed"
        assert nodes["us"].pull("eu", 1, "delta").ok
    finally:
        for n in nodes.values():
            n.close()
