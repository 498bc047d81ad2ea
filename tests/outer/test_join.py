"""Joining a live run through FetchState, over real gRPC.

Members here are real gossip servers (in this process, or in a subprocess that dies mid-stream
like a ``kill -9``) that publish their state with :func:`loco.outer.join.publish_state`, exactly
as a training site's ``StateServer`` does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loco.gossip import GossipNode, GossipServer, rank_range
from loco.outer.join import fetch_range, join, publish_state
from loco.state import MOMENTUM, PHI

ROOT = Path(__file__).resolve().parents[2]
RUN, LAYOUT = "joinrun", "layout0"
P = 10_000  # elements of the (padded) flat vector: 40 kB per stream


def values(seed: int, version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + version)
    return {PHI: torch.randn(P, generator=g), MOMENTUM: torch.randn(P, generator=g)}


def site_servers(site: str, nproc: int, seed: int, version: int, round: int) -> list[GossipServer]:
    """A member of ``nproc`` ranks that has done ``round`` rounds and serves state ``version``."""
    servers = [
        GossipServer(
            site=site,
            rank=r,
            nproc=nproc,
            flat_size=P,
            run_id=RUN,
            layout_hash=LAYOUT,
            insecure=True,
            chunk_bytes=4096,
        )  # fmt: skip
        for r in range(nproc)
    ]
    for s in servers:
        s.start()
    addrs = [s.address for s in servers]
    full = values(seed, version)
    for s in servers:
        s.set_rank_addresses(addrs)
        s.publish(round, "delta", torch.zeros(s.hi - s.lo).numpy())  # Hello's current_round
        publish_state(s, version, {k: v[s.lo : s.hi] for k, v in full.items()}, s.lo, s.hi)
    return servers


def joiner(peers: dict[str, str], **kw) -> GossipNode:
    return GossipNode(
        site="us", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
        listen="127.0.0.1:0", peers=peers, insecure=True, heartbeat=False, **kw,
    ).start()  # fmt: skip


def test_joiner_gets_the_newest_members_state_bitwise_over_other_rank_counts():
    old = site_servers("asia", 1, seed=2, version=3, round=3)
    src = site_servers("eu", 2, seed=1, version=6, round=7)  # furthest ahead: the source
    node = joiner({"eu": src[0].address, "asia": old[0].address})
    try:
        got = join(node=node, lo=0, hi=P, timeout_s=30)
        assert got is not None and (got.site, got.version, got.failed) == ("eu", 6, [])
        want = values(1, 6)
        for k in (PHI, MOMENTUM):
            assert torch.equal(got.tensors[k], want[k])
        # a joiner with 3 ranks: each range is cut from the 2 owner ranks that intersect it
        info = node.client.hello(src[0].address, expect_site="eu")
        parts = []
        for r in range(3):
            lo, hi = rank_range(P, 3, r)
            t, code, cause, _ = fetch_range(node.client, info, PHI, 6, lo, hi, 10.0)
            assert code == 0, cause
            parts.append(t)
        assert torch.equal(torch.cat(parts), want[PHI])
        # the member publishes version 8 into the same slot: the old version is refused
        for s in src:
            publish_state(s, 8, {PHI: torch.zeros(s.hi - s.lo)}, s.lo, s.hi)
        _, code, cause, _ = fetch_range(node.client, info, PHI, 6, 0, P, 10.0)
        assert code == 1 and "version 8" in cause
    finally:
        node.close()
        for s in old + src:
            s.stop(grace=0)


SOURCE = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from loco.outer.join import publish_state
    from loco.testing.gossip_faults import FaultyServer, ServerFault
    from tests.outer.test_join import P, RUN, LAYOUT, values
    s = FaultyServer(site="eu", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                     insecure=True, chunk_bytes=4096, fault=ServerFault(exit_after_chunks=3))
    s.start()
    s.publish(9, "delta", torch.zeros(P).numpy())
    publish_state(s, 9, values(1, 9), 0, P)
    print(s.address, flush=True)
    time.sleep(120)
    """
)


def test_source_dying_mid_fetch_makes_the_joiner_use_another_member():
    # eu is furthest ahead, so it is tried first; its process exits (like kill -9) after
    # sending 3 of the 10 data chunks of phi
    proc = subprocess.Popen([sys.executable, "-c", SOURCE.format(root=str(ROOT))],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    good = site_servers("asia", 1, seed=2, version=4, round=5)
    node = None
    try:
        address = proc.stdout.readline().strip()
        assert address, "the source process did not start"
        node = joiner({"eu": address, "asia": good[0].address}, max_retries=2, backoff_s=0.05)
        said: list[str] = []
        t0 = time.monotonic()
        got = join(node=node, lo=0, hi=P, timeout_s=60, fetch_timeout_s=20, say=said.append)
        assert proc.wait(timeout=10) == 1  # the source died mid-stream
        assert got is not None and (got.site, got.version, got.failed) == ("asia", 4, ["eu"])
        assert torch.equal(got.tensors[PHI], values(2, 4)[PHI])
        assert len(said) == 1 and "eu failed" in said[0] and "another member" in said[0]
        assert time.monotonic() - t0 < 20
    finally:
        proc.kill()
        if node is not None:
            node.close()
        for s in good:
            s.stop(grace=0)


def test_no_member_past_round_zero_means_a_fresh_start():
    fresh = site_servers("eu", 1, seed=1, version=0, round=0)
    node = joiner({"eu": fresh[0].address, "asia": "127.0.0.1:1"})  # asia is down
    try:
        assert join(node=node, lo=0, hi=P, min_round=1, timeout_s=10) is None
        got = join(node=node, lo=0, hi=P, min_round=0, timeout_s=10)  # resume=peer takes it
        assert got is not None and got.version == 0
    finally:
        node.close()
        for s in fresh:
            s.stop(grace=0)


@pytest.mark.parametrize("inner_served", [True, False])
def test_inner_state_is_fetched_when_served(inner_served):
    src = site_servers("eu", 1, seed=1, version=2, round=2)
    extra = {"master": torch.arange(P, dtype=torch.float32), "optim.exp_avg": torch.ones(P)}
    if inner_served:
        publish_state(src[0], 2, extra, 0, P)
    node = joiner({"eu": src[0].address})
    try:
        got = join(node=node, lo=0, hi=P, inner_names=tuple(extra), timeout_s=10)
        assert got is not None and got.inner == inner_served
        if inner_served:
            assert all(torch.equal(got.tensors[k], v) for k, v in extra.items())
        else:
            assert set(got.tensors) == {PHI, MOMENTUM}
    finally:
        node.close()
        src[0].stop(grace=0)


def _publish_bad_state(server: GossipServer, version: int, kind: str) -> None:
    """State streams a hostile member might serve: a non-raw codec label, or NaN, or weights
    far from everyone's, under the slots and names an honest member uses."""
    n = server.hi - server.lo
    for name in (PHI, MOMENTUM):
        data = torch.randn(n, generator=torch.Generator().manual_seed(5)).numpy()
        codec = "raw"
        if kind == "opaque":
            codec = "int8"  # bytes that are not raw fp32: must never land in the joiner's buffer
        elif kind == "nan":
            data[3] = float("nan")
        elif kind == "far" and name == PHI:
            data = data * 1e6
        for key in (f"{name}@{version % 2}", name):
            server.publish_state(key, version, data.tobytes(), codec=codec)


@pytest.mark.parametrize("kind", ["opaque", "nan", "far"])
def test_hostile_state_is_refused_and_the_next_member_used(kind):
    """A source serving a non-raw codec, NaN or implausible weights fails the fetch with a
    strike; the joiner takes the next member's state, never the bad bytes (nor torch.empty)."""
    evil = site_servers("eu", 1, seed=1, version=9, round=9)  # furthest ahead: tried first
    _publish_bad_state(evil[0], 9, kind)
    good = site_servers("asia", 1, seed=2, version=4, round=4)
    node = joiner({"eu": evil[0].address, "asia": good[0].address})
    try:
        own = values(2, 0)[PHI]  # the joiner's own initial weights: the plausibility reference
        got = join(node=node, lo=0, hi=P, timeout_s=30, fetch_timeout_s=5, reference=own)
        assert got is not None and (got.site, got.version, got.failed) == ("asia", 4, ["eu"])
        want = values(2, 4)
        for k in (PHI, MOMENTUM):
            assert torch.equal(got.tensors[k], want[k])
        assert node.metrics.snapshot().get("strikes", 0) >= 1
    finally:
        node.close()
        for s in evil + good:
            s.stop(grace=0)


def test_rank_table_that_overlaps_is_refused_by_hello():
    """Two ranks both claiming [0, 50) of 100 used to 'cover' [0, 100) by the sum of their
    lengths; no ranks at all raised IndexError in join. Both are now a bad rank table."""
    from loco.gossip import PeerInfo, RankInfo

    def info(ranks):
        return PeerInfo("eu", RUN, LAYOUT, 1, len(ranks), 100, tuple(ranks), 3)

    overlap = info([RankInfo(0, "a:1", 0, 50), RankInfo(1, "a:2", 0, 50)])
    assert overlap.problems() and info([]).problems()
    assert info([RankInfo(0, "a:1", 0, 50), RankInfo(1, "a:2", 50, 100)]).problems() == []
    node = joiner({})
    try:
        res = node.client.pull(overlap, 0, "delta", 0, 100)
        assert not res.ok and res.cause == "bad_payload" and "rank table" in str(res.error)
        res = node.client.fetch_state(info([]), "phi", 0, 1)
        assert not res.ok and res.cause == "bad_payload"
    finally:
        node.close()
