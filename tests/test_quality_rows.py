"""Every row of scripts/experiments/quality.py composes: a renamed option or preset fails here,
not an hour into a quality run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from loco.config import compose

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments" / "quality.py"


def _quality():
    spec = importlib.util.spec_from_file_location("quality_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ROWS = _quality().rows(50, "int8", 1000)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_composes_with_its_site_count(name):
    overrides, sites = ROWS[name]
    cfg = compose(["+site=eu", *overrides])
    assert len(cfg.federation.sites) == sites


def test_the_ternary_frontier_row_is_its_preset_at_momentum_0_8():
    cfg = compose(["+site=eu", *ROWS["frontier-ternary"][0]])
    o, c = cfg.outer, cfg.compression
    assert (o.method, o.momentum, o.diloco_reduce, o.H) == ("diloco", 0.8, "sliced", 50)
    assert (c.codec, c.mean_codec, c.block, c.scale_dtype, c.error_feedback) == (
        "ternary", "sign", 512, "fp16", True)  # fmt: skip


def test_the_defaults_are_the_noloco_stepped_row():
    """What a user who sets nothing runs is the row measured as NoLoCo's best (docs/quality.md)."""
    default = compose(["+site=eu"])
    row = compose(["+site=eu", *ROWS["noloco-stepped"][0]])
    assert default.outer == row.outer
    c, r = default.compression, row.compression
    assert (c.codec, c.block, c.scale_dtype, c.error_feedback) == (
        r.codec, r.block, r.scale_dtype, r.error_feedback)  # fmt: skip
    assert (default.outer.method, default.outer.alpha, default.outer.phi_lattice) == (
        "noloco", 0.8, True)  # fmt: skip
    assert default.outer.phi_landing is True and default.outer.phi_landing_bits == 4
    assert default.outer.phi_landing_codec == "normal2"
    assert default.outer.phi_landing_window == "scaled"
    assert default.outer.consensus == "stepped"
    assert ROWS["noloco-landing"][0].count("outer.consensus=weights") == 1  # the row before


def test_the_lean_preset_is_the_noloco_meet2_row():
    """``outer=noloco-lean`` is the row measured at <= 0.25 bytes/param/round."""
    lean = compose(["+site=eu", "outer=noloco-lean"]).outer
    assert lean == compose(["+site=eu", *ROWS["noloco-meet2"][0]]).outer
    assert (lean.meet_every, lean.meet_first, lean.phi_landing_bits) == (2, 10, 3)


def test_the_noloco_rows_keep_the_phi_they_were_measured_with():
    """``noloco`` is int8 deltas with exact phi, ``noloco-frontier`` the lattice both ways:
    the defaults moved under them twice (2026-12-05), the rows must not."""
    from loco.build import lands

    plain = compose(["+site=eu", *ROWS["noloco"][0]]).outer
    assert plain.phi_lattice is False and not lands(plain)
    frontier = compose(["+site=eu", *ROWS["noloco-frontier"][0]]).outer
    assert frontier.phi_lattice is True and not lands(frontier)
    assert lands(compose(["+site=eu", *ROWS["noloco-landing"][0]]).outer)


def test_round_distance_is_the_second_halfs_mean_of_measured_rounds(tmp_path):
    """``round_distance``: rounds past the half of the last, measured ones only (a landing's
    leader records none), and not the final average over every site."""
    import json

    q = _quality()
    rows = {
        "eu": [(1, "us", 9.0), (2, "us", None), (3, "us", 2.0), (4, "us", 4.0),
               (5, "asia,sa,us", 7.0)],
        "us": [(1, "eu", 9.0), (2, "eu", 1.0), (3, "eu", None), (4, "eu", 6.0)],
    }  # fmt: skip
    for site, recs in rows.items():
        (tmp_path / site).mkdir()
        with open(tmp_path / site / "metrics.jsonl", "w") as f:
            for rnd, partner, dist in recs:
                f.write(json.dumps({"kind": "outer", "site": site, "step": rnd * 50,
                                    "round": rnd, "partner": partner,
                                    "consensus_distance": dist}) + "\n")  # fmt: skip
    # eu: rounds 3 and 4 (last pairwise round 4); us: round 4 (3 unmeasured)
    assert q.round_distance(tmp_path, ["eu", "us"]) == (2.0 + 4.0 + 6.0) / 3


def test_the_table_keeps_a_rows_variants_apart():
    """Records of one row pool over seeds, but not across ``--set`` overrides or a record's
    ``variant`` (what the row's defaults were at its commit)."""
    base = {"ok": True, "row": "noloco-landing", "bytes_per_param_round": 1.0, "rounds": 20}
    recs = [
        {**base, "seed": 0, "val_loss": 1.0},
        {**base, "seed": 1, "val_loss": 2.0},
        {**base, "seed": 0, "val_loss": 5.0, "variant": "final in lattice frames"},
        {**base, "seed": 0, "val_loss": 7.0, "set": ["outer.final_lattice=false"]},
    ]
    agg = _quality().aggregate(recs)
    assert agg["noloco-landing"]["loss"] == 1.5 and agg["noloco-landing"]["seeds"] == [0, 1]
    assert agg["noloco-landing [final in lattice frames]"]["loss"] == 5.0
    assert agg["noloco-landing outer.final_lattice=false"]["loss"] == 7.0


def test_the_ddp_row_on_one_gpu_is_one_rank_with_the_four_workers_batch():
    """On cuda the ``ddp`` row's 4 ranks cannot share one GPU (one NCCL rank per device): it
    runs one rank with 4x the batch, the same rows (and tokens) per step as 4 ranks x batch."""
    q = _quality()
    ov, sites = ROWS["ddp"]
    one, batch = q.ddp_on_one_gpu(ov, 8)
    four = compose(["+site=eu", *ov, "train.batch_size=8"])
    cfg = compose(["+site=eu", *one, f"train.batch_size={batch}", "site.device=cuda"])
    assert (four.site.nproc, cfg.site.nproc, batch) == (4, 1, 32)
    assert cfg.site.nproc * cfg.train.batch_size == four.site.nproc * four.train.batch_size
    assert (cfg.outer.method, cfg.outer.H, cfg.site.device) == ("local", 1001, "cuda")
    assert sites == 1 and len(cfg.federation.sites) == 1


def test_the_front_is_the_points_no_other_beats_on_bytes_and_loss():
    q = _quality()
    pts = [
        (0.25, 1.30, "a"),
        (0.25, 1.20, "b"),
        (0.5, 1.25, "c"),
        (1.0, 1.10, "d"),
        (6.0, 1.15, "e"),
    ]
    assert [k for _, _, k in q.pareto(pts)] == ["b", "d"]
    assert q.family("frontier-ternary-8") == "frontier (DiLoCo form)"
    assert q.family("diloco-fragments") == "DiLoCo fp32" and q.family("ddp") == "DDP"


def test_a_record_whose_bytes_are_not_the_codes_is_left_out_of_the_report(tmp_path):
    """``bytes_representative: false`` (a run under a patch outside the repository) is not
    drawn nor tabled; the bytes-against-loss plot of many configurations is written."""
    q = _quality()
    rec = {"ok": True, "steps": 1000, "model": "tiny", "rounds": 20, "val_loss": 1.8,
           "bytes_per_param_round": 0.25, "seed": 0, "set": []}  # fmt: skip
    recs = [{**rec, "row": f"frontier-x{i}", "val_loss": 1.8 + 0.01 * i} for i in range(30)]
    recs.append({**rec, "row": "noloco-patched", "bytes_representative": False})
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a = argparse.Namespace(records=[path], out=tmp_path, steps=1000, model="tiny", device="cpu",
                           H=50, batch=8, seq_len=64)  # fmt: skip
    q.write_report(a)
    table = (tmp_path / "quality.md").read_text()
    assert "frontier-x29" in table and "noloco-patched" not in table
    assert (tmp_path / "bytes_loss.png").stat().st_size > 10_000


def test_the_often_row_syncs_every_10_steps_at_lr_0_7_whatever_H():
    """``frontier-ternary-h10`` is the ternary frontier at H = 10 and outer lr 0.7 at any --H."""
    for H in (50, 25):
        cfg = compose(["+site=eu", *_quality().rows(H, "int8", 1000)["frontier-ternary-h10"][0]])
        base = compose(["+site=eu", *_quality().rows(H, "int8", 1000)["frontier-ternary"][0]])
        assert (cfg.outer.H, cfg.outer.lr, base.outer.H, base.outer.lr) == (10, 0.7, H, 1.3)
        assert cfg.compression == base.compression
        assert (cfg.outer.momentum, cfg.outer.method) == (base.outer.momentum, "diloco")


def test_the_plots_charge_a_row_that_syncs_more_often_for_its_rounds():
    """At 1000 steps and H = 50 a row of 100 rounds at 0.25 bytes/param/round sent 25 per
    parameter: 1.25 per 50 steps; a row of 20 rounds is plotted at its bytes per round."""
    q = _quality()
    assert q.per_nominal_round({"bpr": 0.25, "rounds": 100}, 1000, 50) == 1.25
    assert q.per_nominal_round({"bpr": 0.25, "rounds": 20}, 1000, 50) == 0.25
    assert q.per_nominal_round({"bpr": 400.0, "rounds": 80}, 4000, 50) == 400.0
    assert q.per_nominal_round({"bpr": None, "rounds": 20}, 1000, 50) is None


def test_the_often_noloco_row_is_the_defaults_at_H_10_and_beta_0_4():
    cfg = compose(["+site=eu", *ROWS["noloco-stepped-h10"][0]])
    default = compose(["+site=eu", *ROWS["noloco-stepped"][0]])
    assert (cfg.outer.H, cfg.outer.beta, default.outer.beta) == (10, 0.4, 0.7)
    assert dataclasses.replace(cfg.outer, H=50, beta=0.7) == default.outer
