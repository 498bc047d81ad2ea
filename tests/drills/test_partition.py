"""Drill: a partition {eu} | {us, asia} for several rounds, then healed.

Real ``loco.worker`` processes under ``loco.local``; the partition cuts every gossip RPC across
it (Hello, heartbeat, pull) during rounds [5, 9) (``LOCO_FAULTS``, see loco/testing/faults.py).
Sites pair (``gossip.odd=sit_out``: one of three sits out each round), so the consensus distance
of the pulled phi is a pairwise figure before the fault too.
"""

from __future__ import annotations

from tests.drills.common import (
    SHORT,
    SITES3,
    assert_no_nan_applied,
    assert_report,
    distances,
    outer,
    recovered,
    run_drill,
)

SITES = SITES3
CUT = (5, 9)  # rounds 5..8 are cut
# rounds after eu's first pairing past the heal from which the distance is back to the healthy
# level: one more pairing with each of the other two (a pair moves only part of the way)
RECOVER = 2
ROUNDS = 24  # eu may pair again only rounds after b (see recovered); leave rounds after that


def test_partition_then_heal(tmp_path, monkeypatch, healthy):
    faults = {"partition": {"groups": [["eu"], ["us", "asia"]], "rounds": list(CUT)}}
    ov = [o for o in SHORT if not o.startswith("train.steps=")] + [f"train.steps={ROUNDS * 5}"]
    run_drill(tmp_path, SITES, faults, ov, monkeypatch)
    assert_no_nan_applied(tmp_path, SITES)
    recs = {s: {r["round"]: r for r in outer(tmp_path, s)} for s in SITES}
    for s in SITES:
        assert sorted(recs[s]) == list(range(1, ROUNDS + 1)), s  # every site ran every round
    # the cut was real: eu averaged with nobody, every pull across it failed as unavailable,
    # or (eu ran ahead past b and its Hello reached us, which then proposed it) the pairing
    # agreement across it failed
    for t in range(*CUT):
        assert recs["eu"][t]["n"] == 1, recs["eu"][t]
        for s in SITES:
            for d in filter(None, recs[s][t]["dropped"].split(",")):
                assert d.endswith((":unavailable", ":not_agreed")), (s, t, d)
    # the other side kept averaging between themselves
    assert any(recs[s][t]["n"] == 2 for s in ("us", "asia") for t in range(*CUT))
    # healed: eu pairs again, and the consensus distance is back to a healthy run's level
    assert any(recs["eu"][t]["n"] == 2 for t in range(CUT[1], ROUNDS + 1))
    recovered({s: distances(tmp_path, s) for s in SITES}, healthy, CUT, RECOVER, rejoin="eu")
    assert_report(tmp_path, SITES)
