"""Drill: a peer publishes NaN payloads, then garbage, for several rounds, then heals.

us publishes, instead of its delta and phi, well-formed frames with valid checksums holding NaN
(rounds 5-6), then random bytes (rounds 7-8) (``LOCO_FAULTS``). Its partners reject every
one (the values are decoded and checked before anything is applied), strike it and ban it
for ``gossip.ban_rounds``; nobody ever applies a NaN.
"""

from __future__ import annotations

from tests.drills.common import (
    SHORT,
    SITES3,
    assert_no_nan_applied,
    distances,
    outer,
    recovered,
    run_drill,
)

SITES = SITES3
BAD = (5, 9)
BAN = 2  # gossip.ban_rounds
RECOVER = BAN + 3  # the ban outlasts the fault by up to BAN rounds; then pairs must meet again


def test_nan_and_garbage_payloads(tmp_path, monkeypatch, healthy):
    faults = {"payload": [{"site": "us", "kind": "nan", "rounds": [5, 7]},
                          {"site": "us", "kind": "garbage", "rounds": [7, 9]}]}  # fmt: skip
    ov = [*SHORT, "gossip.strikes=2", f"gossip.ban_rounds={BAN}"]
    run_drill(tmp_path, SITES, faults, ov, monkeypatch)
    assert_no_nan_applied(tmp_path, SITES)
    recs = {s: {r["round"]: r for r in outer(tmp_path, s)} for s in SITES}
    rejected = 0
    for s in ("eu", "asia"):
        for t in range(*BAD):
            r = recs[s][t]
            if "us" in r["partner"].split(","):
                # us's values never entered the group: dropped as bad or banned
                assert r["n"] == 1, r
                cause = dict(d.split(":") for d in r["dropped"].split(","))["us"]
                assert cause in ("bad_payload", "banned"), r
                rejected += 1
    assert rejected >= 1, "the pairing never picked us during the fault; nothing was tested"
    strikes = sum(r.get("strikes", 0) for s in ("eu", "asia") for r in recs[s].values())
    assert strikes >= 1
    # us itself kept training on its own true values, and pairs again after the ban
    assert any(
        recs[s][t]["n"] == 2 and "us" in recs[s][t]["partner"]
        for s in ("eu", "asia") for t in range(BAD[1], 17)
    )  # fmt: skip
    recovered({s: distances(tmp_path, s) for s in SITES}, healthy, BAD, RECOVER)
