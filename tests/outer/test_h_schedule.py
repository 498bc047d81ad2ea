"""The H schedule (``outer.H_first``): the first rounds' own lengths, then every ``outer.H`` steps.

The timetable (boundaries, sync ids, fragments, overlap; a fixed H exactly as before), the
configuration's one-line refusals, a joiner adopting a round's state at that round's boundary,
and real federations on loopback (``loco.local``: real workers, real gRPC) whose rounds fall on
the scheduled steps, with the checkpoints' round ids and a resumed federation agreeing on them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from loco.config import ConfigError, compose
from loco.federation import run_federation
from loco.metrics import read_metrics
from loco.outer.schedule import MAX_FIRST_ROUNDS, Schedule, expected_pulls

# ------------------------------------------------------------------ the timetable


def boundaries(s: Schedule, steps: int) -> dict[int, int]:
    """step -> sync id, for every step of ``1..steps`` that is a boundary."""
    return {d: j for d in range(1, steps + 1) if (j := s.round_at(d)) is not None}


@pytest.mark.parametrize("F,tau", [(1, 0), (1, 7), (5, 0), (5, 4)])
def test_a_fixed_H_is_the_timetable_it_was(F, tau):
    """Without first rounds: sync j at j * H / F, the final average's id after the last sync's."""
    s = Schedule(H=50, steps=1000, tau=tau, fragments=F)
    stride = 50 // F
    assert boundaries(s, 1000) == {d: d // stride for d in range(stride, 1001, stride)}
    assert all(s.final_round(d) == d // stride + 1 for d in range(0, 1001))
    assert all(s.sync_step(j) == j * stride for j in range(1, 101))
    assert [s.end(t) for t in range(5)] == [0, 50, 100, 150, 200]
    assert all(s.rounds_done(d) == d // 50 for d in range(0, 1001))


def test_first_rounds_then_every_H_steps():
    s = Schedule(H=50, steps=1000, first=(10, 20, 40))
    got = boundaries(s, 1000)
    want = [10, 30, 70] + list(range(120, 1001, 50))  # 970 is the last: 30 steps unsynced
    assert sorted(got) == want
    assert [got[d] for d in want] == list(range(1, len(want) + 1))  # ids count the rounds
    assert [s.end(t) for t in range(6)] == [0, 10, 30, 70, 120, 170]
    assert [s.length(t) for t in (1, 2, 3, 4, 40)] == [10, 20, 40, 50, 50]
    assert [s.rounds_done(d) for d in (0, 9, 10, 29, 30, 69, 70, 119, 120, 1000)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 21,
    ]  # fmt: skip
    assert s.final_round(1000) == 22  # after the last sync id, never a sync's
    assert all(s.rounds_done(s.end(t)) == t for t in range(60))


def test_first_rounds_longer_than_H_and_ending_past_the_run():
    s = Schedule(H=10, steps=100, first=(30, 30, 30, 30))
    assert sorted(boundaries(s, 100)) == [30, 60, 90]  # the run ends inside round 4
    assert s.final_round(100) == 4 and s.rounds_done(100) == 3


def test_fragments_with_first_rounds_sync_each_fragment_once_per_round():
    F = 5
    s = Schedule(H=50, steps=400, tau=1, fragments=F, first=(10, 20, 40))
    got = boundaries(s, 400)
    assert list(got.values()) == list(range(1, len(got) + 1))
    assert sorted(got)[:10] == [2, 4, 6, 8, 10, 14, 18, 22, 26, 30]  # strides 2, then 4
    for d, j in got.items():
        t, f = s.round_of(j), s.fragment_of(j)
        assert s.end(t - 1) < d <= s.end(t) and d == s.end(t - 1) + (f + 1) * s.length(t) // F
        assert s.sync_step(j) == d
    assert s.min_stride == 2 and s.stride == 10
    assert s.final_round(400) == max(got.values()) + 1


def test_overlap_merges_tau_steps_after_a_first_round_boundary():
    s = Schedule(H=50, steps=1000, tau=9, first=(10, 20))
    assert s.merge_due(10, 19) and not s.merge_due(10, 18)
    assert s.overlaps(10) and not s.overlaps(1000)
    # fragment_tau by default: the shortest stride - 1
    assert Schedule.make(H=50, steps=100, tau=0, final_average=False, fragments=5,
                         fragment_tau=None, first=(10, 20)).tau == 1  # fmt: skip


def _re(words: str) -> str:
    return r".*".join(map(re.escape, words.split()))


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(first=(10, 0)), "outer.H_first=[10, 0] integer >= 1 (not 0)"),
        (dict(first=(10, -3)), "outer.H_first=[10, -3] (not -3)"),
        (dict(first=(2.5,)), "outer.H_first=[2.5] (not 2.5)"),
        (dict(first=(True,)), "outer.H_first=[True] (not True)"),
        (dict(first=(1,) * (MAX_FIRST_ROUNDS + 1)), "give at most 10000"),
        (
            dict(first=(12,), fragments=5),
            "outer.fragments=5 must divide every outer.H_first (not 12)",
        ),
        (
            dict(first=(10,), tau=10),
            "outer.tau=10 [0, the shortest round of outer.H_first) [0, 10)",
        ),
        (dict(first=(10,), tau=2, fragments=5), "outer.fragment_tau=2 [0, 2)"),
        (dict(H=0), "outer.H=0 >= 1"),
    ],
)
def test_schedule_rejects(kw, words):
    args = dict(H=50, steps=100) | kw
    with pytest.raises(ValueError, match=_re(words)):
        Schedule(**args)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["outer.H_first=[10,0]"], ["outer.H_first=[10, 0]", ">= 1"]),
        (["outer.H_first=[10]", "outer.tau=12"], ["outer.tau=12", "[0, 10)"]),
        (["outer.H_first=[12]", "outer.fragments=5"], ["outer.fragments=5", "outer.H_first"]),
        (
            ["outer.H_first=[10]", "outer.fragments=5", "outer.fragment_tau=3"],
            ["outer.fragment_tau=3", "[0, 2)"],
        ),  # fmt: skip
        (["outer.H_first=[ten]"], ["outer.H_first"]),  # Hydra's type check, one line too
    ],
)
def test_config_rejects_with_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        compose(["+site=eu", *overrides])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_config_accepts_first_rounds():
    cfg = compose(["+site=eu", "outer.H_first=[10,20,40]", "outer.tau=5"])
    assert (cfg.outer.H_first, cfg.outer.H, cfg.outer.tau) == ([10, 20, 40], 50, 5)
    assert compose(["+site=eu"]).outer.H_first == []


# ------------------------------------------------------------------ a joiner


def test_a_joiner_starts_at_the_boundary_of_the_round_it_adopts():
    """adopt() of round v's state starts at the H schedule's end(v) (not v * H), and the
    joiner's next boundary is gossip round v + 1: the members' id for it."""
    from loco.gossip import GossipServer
    from loco.outer import build_outer
    from loco.outer.flat_view import FlatView
    from loco.outer.join import StateServer, adopt, inner_streams, join
    from loco.outer.loop import OuterLoop
    from tests.test_state import fill, make

    eng, outer = make(stage=0)
    fill(eng, outer)  # 3 rounds done
    server = GossipServer(site="eu", rank=0, nproc=1, flat_size=eng.padded, run_id="run",
                          layout_hash=eng.layout_hash, insecure=True)  # fmt: skip
    server.start()
    server.set_rank_addresses([server.address])
    server.publish(3, "delta", torch.zeros(eng.padded).numpy())  # Hello's current_round
    from types import SimpleNamespace

    from loco.gossip import GossipNode

    outer.node = SimpleNamespace(server=server)
    StateServer(outer=outer, inner=True).publish(outer.state.rounds)
    eng2, _ = make(stage=0, seed=9)
    sched = OuterLoop(step=build_outer("noloco"), flat=FlatView(eng2), H=4, steps=100,
                     H_first=(1, 2, 3, 5))  # fmt: skip
    node = GossipNode(site="us", rank=0, nproc=1, flat_size=eng2.padded, run_id="run",
                      layout_hash=eng2.layout_hash, listen="127.0.0.1:0", heartbeat=False,
                      peers={"eu": server.address}, insecure=True)  # fmt: skip
    node.start()
    try:
        lo, hi = eng2.flat_range
        joined = join(node=node, lo=lo, hi=hi, inner_names=inner_streams(eng2), timeout_s=30)
    finally:
        node.close()
        server.stop(grace=0)
    assert joined is not None and joined.version == 3
    start = adopt(joined, outer=sched, engine=eng2)
    assert start == 1 + 2 + 3 and eng2.optim_step == 6 and sched.state.rounds == 3
    s = sched.schedule
    assert [s.round_at(d) for d in range(start + 1, start + 10)] == [
        None, None, None, None, 4, None, None, None, 5,
    ]  # fmt: skip
    assert adopt(joined, outer=sched, engine=eng2, H=4) == 12  # a fixed H as before


# ------------------------------------------------------------------ real federations

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_every=8", "train.eval_batches=2", "train.log_every=4",
    "train.warmup_steps=2", "train.lr=3e-3", "gossip.insecure=true",
    "federation.sites=[eu,us]", "outer.H=8", "outer.H_first=[2,2,4]",
    "outer.final_average=false", "checkpoint.every=12",
]  # fmt: skip
SITES = ["eu", "us"]


def _outer(run: Path) -> dict[str, list[dict]]:
    return {s: read_metrics(run / s / "metrics.jsonl", "outer") for s in SITES}


def _paired_alike(recs: dict[str, list[dict]]) -> None:
    """Both sites merged the same rounds as a pair with the same group mean (same round ids)."""
    eu, us = recs["eu"], recs["us"]
    assert [(r["step"], r["round"]) for r in eu] == [(r["step"], r["round"]) for r in us]
    for a, b in zip(eu, us, strict=True):
        assert a["n"] == b["n"] == 2 and a["mean_crc"] == b["mean_crc"], (a, b)


def test_a_federation_syncs_on_the_H_schedule_and_resumes_on_it(tmp_path):
    """Rounds at steps 2, 4, 8, then every 8: ids 1..5 to step 24 on both sites, paired; the
    checkpoints at 12 and 24 are rounds 3 and 5; resumed to step 40, rounds 6 and 7 fall at 32
    and 40 on both sites, paired again (they agree on the ids after a resume)."""
    out = run_federation([*TINY, "train.steps=24"], tmp_path, timeout=240)
    assert all(r["exit"] == 0 for r in out["sites"]), out
    recs = _outer(tmp_path)
    assert [(r["step"], r["round"]) for r in recs["eu"]] == [
        (2, 1),
        (4, 2),
        (8, 3),
        (16, 4),
        (24, 5),
    ]
    _paired_alike(recs)
    train = read_metrics(tmp_path / "eu" / "metrics.jsonl", "train")
    assert {r["step"]: r["round"] for r in train if r["step"] in (4, 12, 16, 24)} == {
        4: 2, 12: 3, 16: 4, 24: 5,
    }  # fmt: skip
    for s in SITES:
        ck = tmp_path / s / "checkpoints"
        rounds = {p.name: _manifest_round(p) for p in sorted(ck.glob("step_*"))}
        assert rounds == {"step_0000012": 3, "step_0000024": 5}, rounds
    out = run_federation([*TINY, "train.steps=40", "resume=latest"], tmp_path, timeout=240)
    assert all(r["exit"] == 0 for r in out["sites"]), out
    after = {s: [r for r in rs if r["step"] > 24] for s, rs in _outer(tmp_path).items()}
    assert [(r["step"], r["round"]) for r in after["us"]] == [(32, 6), (40, 7)]
    _paired_alike(after)


def test_a_diloco_federation_closes_its_partial_last_round_in_int8(tmp_path):
    """DiLoCo, rounds at 2, 4, 8, 16 of 20 steps: at step 20 the last four steps' progress syncs
    as round 5, ``closing``, in the closing codec (int8 by default: several times a ternary
    round's bytes), and both sites end on one model (the same final parameters)."""
    out = run_federation([*TINY, "outer=diloco", "train.steps=20", "checkpoint.every=0"],
                         tmp_path, timeout=240)  # fmt: skip
    assert all(r["exit"] == 0 for r in out["sites"]), out
    recs = _outer(tmp_path)
    for s in SITES:
        assert [(r["step"], r["round"], bool(r.get("closing"))) for r in recs[s]] == [
            (2, 1, False), (4, 2, False), (8, 3, False), (16, 4, False), (20, 5, True)]  # fmt: skip
        assert recs[s][-1]["n"] == 2
        assert recs[s][-1]["bytes_sent"] > 3 * recs[s][-2]["bytes_sent"]  # int8, not ternary
    crcs = {json.loads((tmp_path / s / "summary.json").read_text())["final_params_crc32"]
            for s in SITES}  # fmt: skip
    assert len(crcs) == 1
    assert all(json.loads((tmp_path / s / "summary.json").read_text())["rounds"] == 4
               for s in SITES)  # fmt: skip


def _manifest_round(step_dir: Path) -> int | None:
    for p in step_dir.rglob("*.json"):
        got = json.loads(p.read_text())
        if isinstance(got, dict) and "round" in got:
            return got["round"]
    return None


def test_expected_pulls_count_one_stream_a_partner_where_no_delta_travels():
    """The pulls a site waits for at the end: delta and phi per partner of the last round
    (DiLoCo, and NoLoCo's stepped form, which sends no delta: one), plus one per final peer."""
    assert expected_pulls(["eu", "us"], False, 3) == 2 * 2 + 3
    assert expected_pulls(["eu", "us"], True, None) == 2
    assert expected_pulls(["eu", "us"], False, 3, sends_delta=False) == 2 + 3
    assert expected_pulls(None, False, 3, sends_delta=False) == 3


def test_meetings_every_other_round_after_dense_first_rounds():
    from loco.outer.schedule import Meetings

    m = Meetings(every=2, first=3)
    assert [t for t in range(1, 12) if m.meets(t)] == [1, 2, 3, 4, 6, 8, 10]
    assert [m.index(t) for t in (1, 2, 3, 4, 6, 8, 10)] == [1, 2, 3, 4, 5, 6, 7]
    plain = Meetings(every=2)  # the leader alternates over meetings: indices 1, 2, 3, ...
    assert [plain.index(t) for t in range(1, 9) if plain.meets(t)] == [1, 2, 3, 4]
    assert all(Meetings().meets(t) and Meetings().index(t) == t for t in range(1, 9))


@pytest.mark.parametrize("last", [10, 11, 12])
def test_meetings_are_counted_back_from_the_last_round(last):
    """With the run's last round known, every ``every``-th round before it is a meeting (after
    the first ones): the last round always is, the count is the same as counted forward, and
    ``index`` numbers them 1, 2, 3, ... without a gap."""
    from loco.outer.schedule import Meetings

    m = Meetings(every=3, first=2, last=last)
    got = [t for t in range(1, last + 1) if m.meets(t)]
    assert got[:2] == [1, 2] and got[-1] == last
    assert all(b - a == 3 for a, b in zip(got[2:-1], got[3:], strict=True))
    assert got[2] <= 5  # no gap longer than ``every`` after the first rounds
    assert len(got) == len([t for t in range(1, last + 1) if Meetings(every=3, first=2).meets(t)])
    assert [m.index(t) for t in got] == list(range(1, len(got) + 1))
    between = [t for t in range(1, last + 1) if not m.meets(t)]
    assert [m.index(t) for t in between] == [len([g for g in got if g < t]) for t in between]
    with pytest.raises(ValueError, match="last round"):
        Meetings(every=2, last=-1)
    assert m.final(2) == frozenset(got[-2:]) and m.final(0) == frozenset()
    assert m.final(100) == frozenset(got) and Meetings(every=3).final(2) == frozenset()
