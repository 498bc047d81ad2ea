"""``gossip.membership=swim`` in whole federations: real workers, SWIM over UDP, gRPC pulls."""

from __future__ import annotations

import pytest

from loco.config import ConfigError, compose
from loco.federation import run_federation
from tests.federation.test_local import TINY, check_groups_agree, outer_records

# these tests are about membership: exact phi, so every pair's means agree bitwise. With the
# default lattice phi a block that fails at a follower lands on two points (docs/outer.md)
EXACT_PHI = ["outer.phi_lattice=false"]


def test_swim_under_mtls_is_accepted_and_needs_a_known_name():
    cfg = compose(["federation.sites=[a,b]", "gossip.membership=swim"], need_site=False)
    assert cfg.gossip.membership == "swim" and not cfg.gossip.insecure
    with pytest.raises(ConfigError, match="gossip.membership"):
        compose(
            ["federation.sites=[a,b]", "gossip.membership=gossip", "gossip.insecure=true"],
            need_site=False,
        )


@pytest.mark.slow
def test_four_sites_with_swim_membership_pair_every_round(tmp_path):
    sites = ["s0", "s1", "s2", "s3"]
    out = run_federation(
        ["federation.sites=[s0,s1,s2,s3]", "train.steps=20", "outer.H=5", "gossip.insecure=true",
         "gossip.membership=swim", "gossip.heartbeat_s=0.5", *EXACT_PHI, *TINY],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    rows = {r["site"]: r for r in out["sites"]}
    assert all(rows[s]["exit"] == 0 for s in sites), (tmp_path / "s0" / "worker.log").read_text()[
        -2000:
    ]
    recs = {
        s: [r for r in rs if not r.get("final")] for s, rs in outer_records(tmp_path, sites).items()
    }
    for s in sites:
        assert [r["n"] for r in recs[s]] == [2, 2, 2, 2], s
    assert check_groups_agree(recs) == 16  # 4 rounds x 4 sites, each in a pair that agreed


@pytest.mark.slow
def test_four_sites_with_swim_under_mtls_pair_every_round(tmp_path):
    """The same under mTLS (certificates made by the federation): pairwise datagram keys
    fetched over the Swim.Key RPC."""
    sites = ["s0", "s1", "s2", "s3"]
    out = run_federation(
        ["federation.sites=[s0,s1,s2,s3]", "train.steps=20", "outer.H=5",
         "gossip.membership=swim", "gossip.heartbeat_s=0.5", *EXACT_PHI, *TINY],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    rows = {r["site"]: r for r in out["sites"]}
    assert all(rows[s]["exit"] == 0 for s in sites), (tmp_path / "s0" / "worker.log").read_text()[
        -2000:
    ]
    recs = {
        s: [r for r in rs if not r.get("final")] for s, rs in outer_records(tmp_path, sites).items()
    }
    for s in sites:
        assert [r["n"] for r in recs[s]] == [2, 2, 2, 2], s
    assert check_groups_agree(recs) == 16
