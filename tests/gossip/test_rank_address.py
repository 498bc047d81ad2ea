"""Rank addresses in Hello: a site listening on all interfaces is reached at the dialed host."""

from __future__ import annotations

import numpy as np

from tests.gossip.conftest import Site


def test_wildcard_rank_addresses_take_the_dialed_host(clients):
    """Two ranks bound to 0.0.0.0 advertise 0.0.0.0:port; the client keeps each port and puts in
    the host it dialed, and pulls both ranks' ranges through it."""
    p = 1000
    site = Site("us", 2, p, listen="0.0.0.0:0", allow_public_plaintext=True).start()
    try:
        assert all(a.startswith("0.0.0.0:") for a in site.servers[0].rank_addresses())
        for s in site.servers:
            s.publish(0, "delta", np.arange(s.lo, s.hi, dtype=np.float32))
        port = site.address.rpartition(":")[2]
        c = clients(site="eu")
        info = c.hello(f"127.0.0.1:{port}", expect_site="us")
        want = [f"127.0.0.1:{s.port}" for s in site.servers]
        assert [r.address for r in info.ranks] == want
        got = c.pull(info, 0, "delta", 0, p)
        assert got.ok and bytes(got.data) == np.arange(p, dtype=np.float32).tobytes()
    finally:
        site.stop()
