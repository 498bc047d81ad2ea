"""A member (any holder of a valid identity) that sends sizes it should not: regression tests.

Each case was found against 91a3673 and made the puller allocate what the peer asked for, or
accept what it should refuse. The hostile servers here are real ``GossipServer``s whose
published segments or header fields (``ServerFault.header``) lie.
"""

from __future__ import annotations

import numpy as np

from tests.hostile.rss import peak_growth_mib


def test_segment_header_claiming_2gib_is_refused_before_allocating():
    """hi = 2**40, length = 2 GiB on a 120-byte opaque segment: refused at the header, with a
    strike, and the puller's peak RSS does not grow by the claimed size (it grew 2 GB)."""
    setup = """
from loco.gossip import GossipClient, GossipServer, ServerFault
srv = GossipServer(site="us", rank=0, nproc=1, flat_size=1000, run_id="r", layout_hash="l",
                   insecure=True, fault=ServerFault(header={"hi": 2**40, "length": 2**31}))
srv.start(); srv.set_rank_addresses([srv.address])
srv.publish(0, "delta", b"x" * 120, codec="int8")
cli = GossipClient(site="eu", run_id="r", layout_hash="l", insecure=True, timeout_s=10)
peer = cli.hello(srv.address, expect_site="us")
"""
    code = """
res = cli.pull(peer, 0, "delta", 0, 1000)
__out = [res.ok, res.cause, cli.metrics.snapshot().get("strikes", 0)]
"""
    grew, (ok, cause, strikes) = peak_growth_mib(setup, code)
    assert (ok, cause, strikes) == (False, "bad_payload", 1)
    assert grew < 64, f"peak RSS grew {grew:.0f} MiB for a refused header"


def test_opaque_segments_are_bounded_by_the_callers_segment_bytes(sites, clients):
    """A frame longer than the caller's bound for its range is refused at its header."""
    site = sites("us", 1, 1000)
    site.servers[0].publish(0, "delta", b"z" * 2000, codec="int8")
    client = clients()
    peer = client.hello(site.address, expect_site="us")
    ok = client.pull(peer, 0, "delta", 0, 1000, segment_bytes=lambda n: 2 * n + 40)
    assert ok.ok and bytes(ok.segments[0].data) == b"z" * 2000
    res = client.pull(peer, 0, "delta", 0, 1000, segment_bytes=lambda n: n + 40)
    assert not res.ok and res.cause == "bad_payload" and "opaque length" in str(res.error)


def test_out_buffer_takes_raw_values_only(sites, clients):
    """A peer answering with a non-raw codec while the caller gave ``out`` used to return
    ok=True with ``out`` untouched (a joiner then adopted torch.empty)."""
    site = sites("us", 1, 100)
    site.servers[0].publish_state("phi", 3, b"q" * 400, codec="int8")
    client = clients()
    out = np.full(100, 7.0, np.float32)
    res = client.fetch_state(client.hello(site.address, expect_site="us"), "phi", 0, 100, out=out)
    assert not res.ok and res.cause == "bad_payload" and "raw" in str(res.error)


def test_fetch_state_pieces_of_two_versions_fail_as_moved(sites, clients):
    """The pieces of one FetchState came from versions 4 and 6 (rank 0 and rank 1): the last
    header used to win and the torn state passed as one version."""
    site = sites("us", 2, 200)
    for rank, version in ((0, 4), (1, 6)):
        s = site.servers[rank]
        s.publish_state("phi@0", version, np.zeros(s.hi - s.lo, np.float32).tobytes())
    client = clients(parallel_streams=2)
    res = client.fetch_state(client.hello(site.address, expect_site="us"), "phi@0", 0, 200)
    assert not res.ok and res.cause == "moved"
    assert client.metrics.snapshot().get("strikes", 0) == 0  # not the peer's fault
