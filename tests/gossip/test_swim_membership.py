"""SwimMembership with real gossip servers on loopback: the same interface as Membership."""

from __future__ import annotations

import time

from loco.gossip import GossipClient
from loco.gossip.swim import SwimOptions
from loco.gossip.swim_membership import SwimMembership
from tests.gossip.conftest import LAYOUT, RUN

KEY = b"run-key-0123456789"


def _wait(cond, limit_s: float) -> None:
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < limit_s:
        time.sleep(0.02)


def test_live_sites_peer_info_death_and_a_foreign_run(sites):
    period = 0.1
    opts = SwimOptions(period_s=period, ack_timeout_s=0.04, suspect_periods=5)
    made = {n: sites(n, 2 if n == "b" else 1, 64) for n in ("a", "b", "c")}
    made["x"] = sites("x", 1, 64, run_id="another-run")
    peers = {n: s.address for n, s in made.items()}
    members = {}
    for n in peers:
        client = GossipClient(site=n, run_id=RUN if n != "x" else "another-run",
                              layout_hash=LAYOUT, insecure=True)  # fmt: skip
        members[n] = SwimMembership(client=client, site=n, peers=peers, udp_listen=peers[n],
                                    key=KEY, options=opts)  # fmt: skip
    try:
        for m in members.values():
            m.start()
        _wait(lambda: all(m.live_sites() == sorted(peers) for m in members.values()), 10)
        assert members["a"].live_sites() == ["a", "b", "c", "x"]
        info = members["a"].peer("b")
        assert info is not None and info.nproc == 2
        # x is live to SWIM but its Hello names another run: refused, and never live again
        assert members["a"].peer("x") is None
        assert members["a"].live_sites() == ["a", "b", "c"]
        assert "another-run" in members["a"].states()["x"].last_error
        members["c"].stop()
        # probed within two passes (2 * 4 periods), 5 suspect periods, spread: ~20 periods;
        # 5x that on a loaded machine
        _wait(lambda: "c" not in members["a"].live_sites(), 5 * 20 * period)
        assert members["a"].live_sites() == ["a", "b"]
        assert members["a"].peer("c") is None
        assert members["a"].beat() == {"b": True, "c": False, "x": False}
    finally:
        for n, m in members.items():
            if n != "c":
                m.stop()


def test_peer_answers_follow_the_peers_round(sites):
    """A late site waits for a peer under way by its Hello's ``current_round``: the cached answer
    is asked again after a period, not kept while the peer stays live (it stayed at its first)."""
    period = 0.1
    opts = SwimOptions(period_s=period, ack_timeout_s=0.04, suspect_periods=5)
    made = {n: sites(n, 1, 64) for n in ("a", "b")}
    peers = {n: s.address for n, s in made.items()}
    members = {n: SwimMembership(client=GossipClient(site=n, run_id=RUN, layout_hash=LAYOUT,
                                                     insecure=True),
                                 site=n, peers=peers, udp_listen=peers[n], key=KEY, options=opts)
               for n in peers}  # fmt: skip
    try:
        for m in members.values():
            m.start()
        _wait(lambda: members["a"].live_sites() == ["a", "b"], 10)
        first = members["a"].peer("b").current_round
        assert first < 3
        made["b"].servers[0].publish(3, "delta", bytes(64 * 4))
        assert members["a"].peer("b").current_round == first  # within the period: the cache
        time.sleep(period * 1.5)
        assert members["a"].peer("b").current_round == 3
    finally:
        for m in members.values():
            m.stop()
