"""``loco.summary.outer_summary``'s counts over a run's records: the closing syncs of DiLoCo's
tails (``closing``) are not rounds, so a dropped one is counted apart."""

from __future__ import annotations

from types import SimpleNamespace

from loco.config import LocoConfig
from loco.summary import outer_summary


def _rec(step, rnd, dropped="", closing=False, fragment=None):
    rec = {"step": step, "round": rnd, "dropped": dropped, "compute_utilization": 1.0,
           "window_seconds": 1.0, "consensus_distance": None}  # fmt: skip
    if closing:
        rec["closing"] = True
    if fragment is not None:
        rec["fragment"] = fragment
    return rec


def _outer(history):
    return SimpleNamespace(history=history, totals={"bytes_sent": 0.0, "bytes_recv": 0.0},
                           flat=SimpleNamespace(numel=10), final=None)  # fmt: skip


def test_dropped_closing_syncs_are_not_dropped_rounds():
    """Rounds 1-2 of fragments 0-1 (round 2's fragment 1 dropped), then round 3's closing syncs
    of both fragments, one dropped: two rounds, one of them dropped, one closing sync dropped."""
    hist = [_rec(5, 1, fragment=0), _rec(10, 1, fragment=1), _rec(15, 2, fragment=0),
            _rec(20, 2, "us:timeout", fragment=1), _rec(22, 3, closing=True, fragment=0),
            _rec(22, 3, "us:timeout", closing=True, fragment=1)]  # fmt: skip
    got = outer_summary(LocoConfig(), _outer(hist), 22)
    assert (got["rounds"], got["rounds_dropped"], got["closing_dropped"]) == (2, 1, 1)


def test_no_closing_syncs_count_as_before():
    hist = [_rec(5, 1, "eu:bad frame"), _rec(10, 2), _rec(15, 3, "eu:timeout")]
    got = outer_summary(LocoConfig(), _outer(hist), 15)
    assert (got["rounds"], got["rounds_dropped"], got["closing_dropped"]) == (3, 2, 0)
    assert got["ddp_bytes"] == 8.0 * 10 * 15
