"""A member (any holder of a valid identity) that sends sizes it should not: regression tests.

Each case was found against 91a3673 and made the puller allocate what the peer asked for, or
accept what it should refuse. The hostile servers here are real ``GossipServer``s whose
published segments lie, or ``loco.testing`` ``FaultyServer``s whose header fields
(``ServerFault.header``) lie.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gossip.conftest import LAYOUT, RUN
from tests.hostile.rss import peak_growth_mib


def test_segment_header_claiming_2gib_is_refused_before_allocating():
    """hi = 2**40, length = 2 GiB on a 120-byte opaque segment: refused at the header, with a
    strike, and the puller's peak RSS does not grow by the claimed size (it grew 2 GB)."""
    setup = """
from loco.gossip import GossipClient
from loco.testing.gossip_faults import FaultyServer, ServerFault
srv = FaultyServer(site="us", rank=0, nproc=1, flat_size=1000, run_id="r", layout_hash="l",
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


# ---------------------------------------------------------------- scripted hostile member


def _member(**kw):
    from tests.hostile.member import HostileMember

    kw.setdefault("site", "us")
    return HostileMember(run_id=RUN, layout_hash=LAYOUT, insecure=True, **kw)


def _segment(m, lo, hi, data, *, codec="int8", round=0):
    from tests.hostile.member import segment_messages

    return segment_messages(lo, hi, data, codec=codec, round=round, stream="delta", site="us",
                            run_id=RUN, layout_hash=LAYOUT)  # fmt: skip


def test_segments_after_the_range_is_complete_are_refused(clients):
    """150 more opaque segments after the first one covered the range used to be accepted
    (18 KB on the wire; each then decoded by the round's validator to its full bound)."""
    with _member(flat_size=10_000) as m:
        extra = [msg for k in range(1, 151) for msg in _segment(m, k, 10_000, b"y" * 120)]
        m.pull = lambda req: _segment(m, 0, 10_000, b"y" * 120) + extra
        client = clients()
        res = client.pull(client.hello(m.address, expect_site="us"), 0, "delta", 0, 100)
        assert not res.ok and res.cause == "bad_payload" and "complete" in str(res.error)
        assert client.metrics.snapshot()["strikes"] == 1


def test_opaque_segment_outside_the_owners_range_is_refused(clients):
    """An opaque segment may start before the wanted element but never leave its owner rank's
    range (hi = 2**40 passed the old check ``lo <= next < hi``)."""
    with _member(flat_size=1000, nproc=2) as m:
        m.pull = lambda req: _segment(m, 0, 2**40, b"y" * 120)
        client = clients()
        res = client.pull(client.hello(m.address, expect_site="us"), 0, "delta", 0, 400)
        assert not res.ok and res.cause == "bad_payload" and "rank [0,500)" in str(res.error)


def test_empty_data_chunks_are_refused(clients):
    """Empty chunks pass every length and CRC check: a member could stream them until the
    deadline (the old client timed out after the whole deadline instead of striking)."""
    import itertools

    from loco.gossip.framing import encode_data

    with _member(flat_size=100) as m:
        head = _segment(m, 0, 100, bytes(400), codec="raw")[0]
        m.pull = lambda req: itertools.chain([head], itertools.repeat(encode_data(b"")))
        client = clients(timeout_s=5.0)
        res = client.pull(client.hello(m.address, expect_site="us"), 0, "delta", 0, 100)
        assert not res.ok and res.cause == "bad_payload" and res.seconds < 2.0


@pytest.mark.parametrize("table", ["overlap", "none", "huge_nproc", "past_the_end", "order"])
def test_hello_with_a_bad_rank_table_is_a_mismatch(clients, table):
    """Two ranks both claiming [0, 50) of 100 'covered' [0, 100) by the sum of their lengths
    and ``out[50:]`` was never written (ok=True); no ranks raised IndexError in join."""
    from loco.gossip import PeerMismatch
    from loco.gossip._pb import gossip_pb2 as pb

    def hello(req):
        msg = m.honest_hello(req)
        del msg.ranks[:]
        ranks = {"overlap": [(0, 0, 50), (1, 0, 50)], "none": [], "huge_nproc": [(0, 0, 100)],
                 "past_the_end": [(0, 0, 50), (1, 50, 2**40)], "order": [(1, 50, 100), (0, 0, 50)],
                 }[table]  # fmt: skip
        msg.ranks.extend(pb.RankInfo(rank=r, address=m.address, lo=a, hi=b) for r, a, b in ranks)
        msg.nproc = 2**31 if table == "huge_nproc" else max(1, len(ranks))
        return msg

    with _member(flat_size=100, nproc=2, hello=hello) as m:
        client = clients()
        with pytest.raises(PeerMismatch, match="rank table"):
            client.hello(m.address, expect_site="us")
