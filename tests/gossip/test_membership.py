"""Pairing (deterministic matching) and membership (heartbeats, death, rejoin)."""

from __future__ import annotations

import hashlib
import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loco.gossip import Membership, group_of, pairing, partners
from loco.gossip.pairing import permutation
from tests.gossip.conftest import Site

names = st.lists(st.text("abcdefghij", min_size=1, max_size=4), unique=True, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    rnd=st.integers(0, 10**6),
    live=names,
    odd=st.sampled_from(["triple", "sit_out"]),
)
def test_pairing_is_a_partition(seed, rnd, live, odd):
    groups = pairing(seed, rnd, live, odd)
    flat = sorted(itertools.chain.from_iterable(groups))
    assert flat == sorted(live)
    sizes = sorted(len(g) for g in groups)
    if len(live) % 2 == 0:
        assert all(s == 2 for s in sizes)
    elif len(live) == 1:
        assert sizes == [1]
    else:
        assert sizes.count(2 if odd == "sit_out" else 3) >= 1
        assert sizes.count(3 if odd == "triple" else 1) == 1
    # only the set matters: order and duplicates of the input do not
    assert pairing(seed, rnd, list(reversed(live)) + live, odd) == groups


def test_pairing_reference_values():
    """Golden values: any re-implementation (NumPy reference, other language) must match."""

    def ref(seed, rnd, live):
        out = sorted(set(live))
        for i in range(len(out) - 1, 0, -1):
            d = hashlib.sha256(f"loco-pairing/{seed}/{rnd}/{i}".encode()).digest()
            j = int.from_bytes(d[:8], "big") % (i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    live = ["asia", "eu", "us", "sa", "af"]
    for rnd in range(20):
        assert permutation(7, rnd, live) == ref(7, rnd, live)
    assert pairing(0, 0, ["eu", "us"]) == [("eu", "us")]


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hypercube_pairing_averages_everyone_in_log2_n_meetings(n):
    """Any log2(n) meetings in a row: exact pair averaging of one-hot vectors leaves every
    site at the mean of all (random matchings need far more); each meeting is a partition."""
    import numpy as np

    names = [f"s{i:02d}" for i in range(n)]
    k = n.bit_length() - 1
    for start in (1, 2, 7):
        x = {s: np.eye(n)[i] for i, s in enumerate(names)}
        for r in range(start, start + k):
            groups = pairing(3, r, names, mode="hypercube")
            assert sorted(s for g in groups for s in g) == names and all(
                len(g) == 2 for g in groups
            )
            for a, b in groups:
                x[a] = x[b] = (x[a] + x[b]) / 2
        assert all(np.allclose(v, 1 / n) for v in x.values())
    assert pairing(3, 1, names, mode="hypercube") == pairing(3, 1 + k, names, mode="hypercube")


def test_hypercube_pairing_falls_back_to_random_off_powers_of_two():
    live = ["a", "b", "c", "d", "e", "f"]
    assert pairing(1, 4, live, mode="hypercube") == pairing(1, 4, live)
    assert pairing(1, -3, live[:4], mode="hypercube") == pairing(1, -3, live[:4])
    with pytest.raises(ValueError, match="mode"):
        pairing(1, 1, live, mode="ring")


def test_pairing_varies_over_rounds():
    live = [f"s{i}" for i in range(8)]
    seen = {tuple(pairing(1, r, live)) for r in range(50)}
    assert len(seen) > 30
    assert partners(1, 3, live, "s0") == [
        s for s in group_of("s0", pairing(1, 3, live)) if s != "s0"
    ]
    assert partners(1, 3, live, "gone") == []
    with pytest.raises(ValueError, match="odd"):
        pairing(1, 1, live, odd="random")


def test_odd_sit_out_site_has_no_partner():
    live = ["a", "b", "c"]
    for rnd in range(10):
        groups = pairing(5, rnd, live, odd="sit_out")
        alone = [g[0] for g in groups if len(g) == 1]
        assert len(alone) == 1 and partners(5, rnd, live, alone[0], odd="sit_out") == []


def test_membership_heartbeats_death_and_rejoin(clients):
    us = Site("us", 2, 100).start()
    asia = Site("asia", 1, 100).start()
    try:
        client = clients(site="eu")
        m = Membership(
            client=client,
            site="eu",
            peers={"us": us.address, "asia": asia.address, "eu": "ignored:1"},
            heartbeat_s=0.05,
            dead_after=2,
            hello_timeout_s=0.5,
        )
        assert m.live_sites() == ["eu"]
        assert m.beat() == {"us": True, "asia": True}
        assert m.live_sites() == ["asia", "eu", "us"]
        assert m.peer("us").nproc == 2
        port = int(asia.address.rsplit(":", 1)[1])
        asia.stop()
        assert m.beat()["asia"] is True  # one miss is not death
        assert m.beat()["asia"] is False
        assert m.live_sites() == ["eu", "us"] and m.peer("asia") is None
        asia2 = Site("asia", 1, 100, listen=f"127.0.0.1:{port}").start()  # restarts, same address
        try:
            deadline = time.monotonic() + 5  # the channel reconnects after its backoff
            while not m.beat()["asia"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert m.live_sites() == ["asia", "eu", "us"]
        finally:
            asia2.stop()
        m.start()  # background heartbeats end cleanly
        m.stop()
    finally:
        us.stop()
        asia.stop()


def test_membership_rejects_other_run(clients):
    other = Site("us", 1, 100, run_id="other-run").start()
    try:
        m = Membership(
            client=clients(site="eu"), site="eu", peers={"us": other.address}, hello_timeout_s=0.5
        )
        assert m.beat() == {"us": False}
        assert "run_id" in m.states()["us"].last_error
    finally:
        other.stop()
