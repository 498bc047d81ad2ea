"""DiLoCo's sliced reduce (``loco.outer.sliced``) on loopback: real GossipNodes, real codecs,
every rank of every site an ``OuterLoop`` on a thread.

What must hold: every site applies bitwise the same mean (so phi stays equal), that mean is
the full reduce's within the codec's error, a site receives ``2 (n - 1) / n`` deltas instead
of ``n - 1``, a dead owner's slice is averaged by the others themselves, and sites of
different rank counts line up.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from loco.compress import PayloadError, decode, encode, make_codec
from loco.config import ConfigError, compose
from loco.gossip import GossipNode
from loco.outer import build_outer
from loco.outer.exchange import RangePayloads, codec_options
from loco.outer.loop import OuterLoop
from loco.outer.sliced import (
    OtherView,
    SlicedReduce,
    pack_marker,
    pack_mean,
    pieces,
    slice_bounds,
    unpack_mean,
)
from loco.ranges import rank_range
from tests.outer.test_loop import run_parallel

RUN, LAYOUT = "sliced-test", "layout-s"
P = 3001  # not a multiple of the codec block, nor of the site or rank counts
H = 5


class RangeFlat:
    """A flat view over ``[lo, hi)`` of a plain tensor (one rank of a site)."""

    def __init__(self, theta: torch.Tensor, lo: int, hi: int, padded: int) -> None:
        self.theta = theta
        self.lo, self.hi, self.slo, self.shi = lo, min(hi, P), lo, hi
        self.numel, self.padded, self.layout_hash = P, padded, LAYOUT

    def master(self) -> torch.Tensor:
        return self.theta

    def sync(self) -> None:
        pass


def federation(spec: dict[str, int], codec: str, reduce: str = "sliced", dead=(), tau=0,
               sees: dict[str, tuple[str, ...]] | None = None, fragments: int = 1,
               mean_codec: str | None = None, mean_ef: bool = False, block: int = 256,
               scale_dtype: str = "fp32"):  # fmt: skip
    """``{site: [OuterLoop per rank]}``; every site starts from the same weights. The sites in
    ``dead`` are configured peers that never answer; ``sees[site]``: more dead peers that only
    ``site`` is configured with (another view of the members). ``fragments``: streaming
    fragments (H = 5: fragment f syncs at step f + 1 of each round). ``mean_codec``: the
    codec of the slice averages (None: ``codec``), ``mean_ef``: their owners' error feedback;
    ``block`` and ``scale_dtype`` apply to both codecs."""
    theta0 = torch.from_numpy(np.random.default_rng(7).standard_normal(P).astype(np.float32))
    sites: dict[str, list[OuterLoop]] = {}
    for site, nproc in spec.items():
        padded = -(-P // nproc) * nproc
        nodes = [
            GossipNode(site=site, rank=r, nproc=nproc, flat_size=padded, run_id=RUN,
                       layout_hash=LAYOUT, listen="127.0.0.1:0", peers={}, insecure=True,
                       heartbeat=False, pull_timeout_s=5.0, hello_timeout_s=1.0,
                       max_retries=1, backoff_s=0.05, keep_rounds=2 * fragments).start()
            for r in range(nproc)
        ]  # fmt: skip
        addrs = [n.server.address for n in nodes]
        loops = []
        for r, node in enumerate(nodes):
            node.server.set_rank_addresses(addrs)
            slo, shi = rank_range(padded, nproc, r)
            flat = RangeFlat(theta0[slo : min(shi, P)].clone(), slo, shi, padded)
            opts = codec_options(codec, block=block, scale_dtype=scale_dtype, stochastic=False,
                                 topk_fraction=0.1)  # fmt: skip
            mopts = codec_options(mean_codec or codec, block=block, scale_dtype=scale_dtype,
                                  stochastic=False, topk_fraction=0.1)  # fmt: skip
            means = dict(mean_codec=mean_codec, mean_options=mopts, mean_error_feedback=mean_ef)
            pay = RangePayloads(shard=(slo, shi), owned=(flat.lo, flat.hi), codec=codec,
                                delta_options=opts, flat_size=padded, **means)  # fmt: skip

            def payloads_for(span, codec=codec, opts=opts, padded=padded, means=means):
                return RangePayloads(shard=span, owned=span, codec=codec, delta_options=opts,
                                     flat_size=padded, **means)  # fmt: skip

            loops.append(OuterLoop(step=build_outer("diloco"), flat=flat, H=H, steps=100,
                                   node=node, payloads=pay, site=site, all_live=True, tau=tau,
                                   linger_s=1.0, diloco_reduce=reduce, fragments=fragments,
                                   payloads_for=payloads_for))  # fmt: skip
        sites[site] = loops
    for site, loops in sites.items():
        peers = {s: ls[0].node.server.address for s, ls in sites.items() if s != site}
        extra = (sees or {}).get(site, ())
        peers.update({d: "127.0.0.1:9" for d in (*dead, *extra)})  # discard port: refused
        for loop in loops:
            loop.node.peers = peers
    return sites


def close(sites) -> None:
    for loops in sites.values():
        for loop in loops:
            loop.close()


def train_round(sites, seed: int = 0, rounds: int = 1) -> dict[str, torch.Tensor]:
    """Move every rank's theta (a site's own noise, the same on its ranks' pieces) for
    ``rounds`` rounds; return each site's true delta at the last boundary (whole vector)."""
    true: dict[str, list[torch.Tensor]] = {s: [None] * len(ls) for s, ls in sites.items()}

    def run(site: str, r: int, loop: OuterLoop) -> None:
        g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, site)))
        for s in range(1, rounds * H + 1):
            noise = 0.01 * torch.randn(P, generator=g)
            loop.flat.theta.add_(noise[loop.flat.lo : loop.flat.hi])
            if s == rounds * H:
                true[site][r] = loop.flat.theta - loop.state.phi
            loop.on_step_end(s)
        loop.finish()

    run_parallel([lambda s=s, r=r, lp=lp: run(s, r, lp)
                  for s, ls in sites.items() for r, lp in enumerate(ls)], timeout=90)  # fmt: skip
    return {s: torch.cat(v) for s, v in true.items()}


def site_cat(loops, what) -> torch.Tensor:
    return torch.cat([what(lp) for lp in loops])


def test_sliced_mean_is_bitwise_equal_everywhere_and_the_full_mean_within_the_codec():
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    got = {}
    for reduce in ("sliced", "full"):
        sites = federation(spec, "int8", reduce)
        try:
            true = train_round(sites)
            got[reduce] = {s: site_cat(ls, lambda lp: lp.last_means[0]) for s, ls in sites.items()}
            phis = {s: site_cat(ls, lambda lp: lp.state.phi) for s, ls in sites.items()}
            assert all(ls[0].history[0]["n"] == 4 for ls in sites.values())
            # error feedback: each piece's encoder kept its part of the rank's residual
            assert all(int((ls[0].payloads.ef.residual[:P] != 0).sum()) > P // 2
                       for ls in sites.values())  # fmt: skip
        finally:
            close(sites)
        means = list(got[reduce].values())
        assert all(torch.equal(m, means[0]) for m in means), reduce
        assert all(torch.equal(p, phis["asia"]) for p in phis.values()), reduce
    exact = torch.stack(list(true.values())).mean(0)
    big = max(float(d.abs().max()) for d in true.values())
    # int8 rounds to the nearest of 255 levels of a block's largest value: each decoded delta
    # is off by <= M / 254; the sliced mean is re-encoded once more (<= M / 254 again)
    step = big / 254 * 1.001
    assert float((got["full"]["asia"] - exact).abs().max()) <= step
    assert float((got["sliced"]["asia"] - exact).abs().max()) <= 2 * step
    assert float((got["sliced"]["asia"] - exact).abs().max()) > 0  # the codec did round


def test_bytes_per_site_are_a_ring_all_reduce():
    """codec none: a site receives 2 (n - 1) / n deltas (+ the average's frame headers) with
    ``sliced``, n - 1 with ``full``, measured in the same run."""
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    n, S = len(spec), 4 * P
    recv = {}
    for reduce in ("sliced", "full"):
        sites = federation(spec, "none", reduce)
        try:
            train_round(sites)
            recv[reduce] = [ls[0].history[0]["bytes_recv"] for ls in sites.values()]
        finally:
            close(sites)
    headers = (n - 1) * (40 + 8 + 1)  # a frame header, the member prefix and mask per average
    for b in recv["sliced"]:
        assert 2 * (n - 1) / n * S <= b <= 2 * (n - 1) / n * S + headers + n * 4, recv
    for b in recv["full"]:
        assert b == (n - 1) * S, recv


def test_one_bit_deltas_cost_two_n_minus_one_over_n_sign_payloads():
    """codec sign: a site receives 2 (n - 1) / n of a one-bit payload (P / 8 bytes of signs
    and a 4-byte scale per 256 values), plus per frame its header, the member prefix and mask,
    one partial block's scale and one partial byte."""
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    n = len(spec)
    sites = federation(spec, "sign")
    try:
        train_round(sites)
        recv = [ls[0].history[0]["bytes_recv"] for ls in sites.values()]
    finally:
        close(sites)
    body = 2 * (n - 1) / n * P * (1 / 8 + 4 / 256)
    per_frame = 40 + 8 + 1 + 4 + 1
    for b in recv:
        assert body - 2 * (n - 1) * 8 <= b <= body + 2 * (n - 1) * per_frame, (b, body)
    # fp32 would be 28.4x the body; at this small P the frame headers take a third
    assert max(recv) < 2 * (n - 1) / n * 4 * P / 15


def test_a_mean_codec_of_its_own_re_encodes_the_averages_only():
    """``compression.mean_codec``: int8 deltas, one-bit slice averages. A site receives
    (n - 1) / n of an int8 payload and (n - 1) / n of a one-bit one; every site applies
    bitwise the same mean, and that mean is a sign code (one magnitude per 256-block)."""
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    n = len(spec)
    sites = federation(spec, "int8", mean_codec="sign")
    try:
        true = train_round(sites)
        recv = [ls[0].history[0]["bytes_recv"] for ls in sites.values()]
        means = {s: ls[0].last_means[0] for s, ls in sites.items()}
        phis = {s: ls[0].state.phi for s, ls in sites.items()}
        assert all(ls[0].payloads.mean_codec == "sign" for ls in sites.values())
    finally:
        close(sites)
    assert all(torch.equal(m, means["asia"]) for m in means.values())
    assert all(torch.equal(p, phis["asia"]) for p in phis.values())
    body = (n - 1) / n * P * ((1 + 4 / 256) + (1 / 8 + 4 / 256))
    per_frame = 40 + 8 + 1 + 4 + 1
    for b in recv:
        assert body - 2 * (n - 1) * 8 <= b <= body + 2 * (n - 1) * per_frame, (b, body)
    # each slice average is one magnitude per block of 256 inside the owner's slice: count
    # the distinct magnitudes per slice, at most one per block the slice meets (+1 each cut)
    mean = means["asia"]
    for k in range(n):
        a, b = slice_bounds(P, n, k)
        mags = mean[a:b].abs().unique()
        assert len(mags) <= -(-(b - a) // 256) + 1, (k, len(mags))
    # and it still follows the true mean: the sign of most values agrees with it
    exact = torch.stack(list(true.values())).mean(0)
    assert float((torch.sign(mean) == torch.sign(exact)).float().mean()) > 0.7


def test_the_ternary_sign_preset_sends_under_a_quarter_byte_per_value_at_four_sites():
    """compression=ternary-sign: ternary deltas and one-bit slice averages, blocks of 512 with
    fp16 scales. A site receives (n - 1) / n of each payload (what it sends, by symmetry);
    per value 3/4 (102.4 + 2 + 64 + 2) / 512 = 0.2467 bytes without headers, so <= 0.25
    with them at a real size; every site applies bitwise the same mean."""
    c = compose(["+site=eu", "outer=diloco-frontier", "compression=ternary-sign"]).compression
    assert (c.codec, c.mean_codec, c.block, c.scale_dtype) == ("ternary", "sign", 512, "fp16")
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    n = len(spec)
    sites = federation(spec, c.codec, mean_codec=c.mean_codec, block=c.block,
                       scale_dtype=c.scale_dtype)  # fmt: skip
    try:
        train_round(sites)
        recv = [ls[0].history[0]["bytes_recv"] for ls in sites.values()]
        phis = {s: ls[0].state.phi for s, ls in sites.items()}
    finally:
        close(sites)
    assert all(torch.equal(p, phis["asia"]) for p in phis.values())
    per_value = (512 / 5 + 2 + 512 / 8 + 2) / 512
    # n - 1 delta pieces and n - 1 averages, each a 40-byte header; an average's also a member
    # prefix and mask (9); each frame ends in a partial block (scale, byte) of up to 3 bytes
    fixed = (n - 1) * 40 + (n - 1) * (40 + 9)
    body = (n - 1) / n * P * per_value + fixed
    for b in recv:
        assert body - 2 * (n - 1) * 3 <= b <= body + 2 * (n - 1) * 3, (b, body)
    # a site's per-round bytes at a million values, from the preset's codec layouts
    big, opts = 1 << 20, dict(block=c.block, scale_dtype=c.scale_dtype)
    piece = big // n
    sent = sum(
        (n - 1) * make_codec(k, **opts).payload_nbytes(piece) for k in (c.codec, c.mean_codec)
    )
    assert (sent + fixed) / big <= 0.25


def test_a_dead_owner_s_slice_is_averaged_by_every_site_itself():
    sites = federation({"asia": 1, "eu": 1, "us": 1}, "int8", dead=("sa",))
    try:
        true = train_round(sites)
        recs = {s: ls[0].history[0] for s, ls in sites.items()}
        means = [site_cat(ls, lambda lp: lp.last_means[0]) for ls in sites.values()]
    finally:
        close(sites)
    for rec in recs.values():
        assert rec["n"] == 3 and rec["dropped"].startswith("sa:"), rec
        assert rec["fail_slice_fallback"] == 1, rec  # sa owned slice 2 of 4
    assert all(torch.equal(m, means[0]) for m in means)
    exact = torch.stack(list(true.values())).mean(0)
    big = max(float(d.abs().max()) for d in true.values())
    assert float((means[0] - exact).abs().max()) <= 2 * big / 254 * 1.001


def test_an_implausible_average_is_struck_and_its_slice_averaged_here():
    """us publishes finite garbage (1e30) as its slice's average: asia and eu strike it, average
    that slice themselves, and agree; no garbage reaches them."""
    sites = federation({"asia": 1, "eu": 1, "us": 1}, "int8")
    sites["us"][0].rounds.sliced._encode_mean = lambda v, a, b: encode(
        torch.full_like(v, 1e30), "int8"
    )
    try:
        true = train_round(sites)
        recs = {s: ls[0].history[0] for s, ls in sites.items()}
        means = {s: site_cat(ls, lambda lp: lp.last_means[0]) for s, ls in sites.items()}
    finally:
        close(sites)
    for s in ("asia", "eu"):
        rec = recs[s]
        assert rec["fail_implausible"] == 1 and rec["fail_slice_fallback"] == 1, rec
        assert rec["strikes"] == 1 and rec["n"] == 3, rec
    assert torch.equal(means["asia"], means["eu"])
    exact = torch.stack(list(true.values())).mean(0)
    big = max(float(d.abs().max()) for d in true.values())
    assert float((means["asia"] - exact).abs().max()) <= 2 * big / 254 * 1.001


def test_another_view_of_the_members_falls_back_without_a_strike():
    """us counts a dead site sa as a member, asia and eu do not: the averages of either side
    are over other members, so each side averages the other side's slices itself; nobody is
    struck, every site still averages all three deltas."""
    sites = federation({"asia": 1, "eu": 1, "us": 1}, "int8", sees={"us": ("sa",)})
    try:
        true = train_round(sites)
        recs = {s: ls[0].history[0] for s, ls in sites.items()}
        means = {s: site_cat(ls, lambda lp: lp.last_means[0]) for s, ls in sites.items()}
    finally:
        close(sites)
    for s, rec in recs.items():
        assert rec["n"] == 3 and not rec.get("strikes"), rec
        assert rec["fail_slice_other_view"] == 2 if s == "us" else 1, rec
    assert torch.equal(means["asia"], means["eu"])  # the same averages and the same fallback
    exact = torch.stack(list(true.values())).mean(0)
    big = max(float(d.abs().max()) for d in true.values())
    for m in means.values():
        assert float((m - exact).abs().max()) <= 2 * big / 254 * 1.001


@pytest.mark.parametrize("codec", ["none", "int8", "sign", "int8+sign", "int8+sign+ef"])
def test_sites_of_two_and_one_ranks_line_up(codec):
    """Rank boundaries cut the slices; a rank handles its part of each slice (``a+b``: deltas
    in ``a``, slice averages in ``b``)."""
    spec = {"asia": 1, "eu": 2, "us": 1}
    codec, _, mean_codec = codec.partition("+")
    mean_codec, _, ef = mean_codec.partition("+")
    sites = federation(spec, codec, tau=2 if codec != "none" else 0,
                       mean_codec=mean_codec or None, mean_ef=bool(ef))  # fmt: skip
    try:
        true = train_round(sites, rounds=2)
        means = {s: site_cat(ls, lambda lp: lp.last_means[0]) for s, ls in sites.items()}
        phis = {s: site_cat(ls, lambda lp: lp.state.phi) for s, ls in sites.items()}
        recs = [lp.history[-1] for ls in sites.values() for lp in ls]
    finally:
        close(sites)
    assert all(r["n"] == 3 and not r["dropped"] for r in recs), recs
    assert all(torch.equal(m, means["asia"]) for m in means.values())
    assert all(torch.equal(p, phis["asia"]) for p in phis.values())
    if codec == "none":  # lossless: exactly the mean in site order
        exact = torch.stack([true[s] for s in sorted(true)]).mean(0)
        assert torch.allclose(means["asia"], exact, atol=1e-6, rtol=0)


def test_mean_frame_is_checked_before_use():
    members = ["asia", "eu", "us"]
    frame = encode(torch.ones(10), "none")
    buf = pack_mean(members, ["asia", "us"], frame)
    values, got = unpack_mean(buf, members, 10)
    assert got == {"asia", "us"} and torch.equal(values, torch.ones(10))
    for bad in (
        buf[:5],  # shorter than its header
        b"XXXX" + buf[4:],  # magic
        buf[:10] + bytes([buf[10] | 0x80]) + buf[11:],  # a mask bit past the members
        buf[:-1],  # truncated frame
    ):
        with pytest.raises(PayloadError):
            unpack_mean(bad, members, 10)
    with pytest.raises(PayloadError):  # more values than the segment holds
        unpack_mean(buf, members, 9)
    with pytest.raises(PayloadError):  # a marker where an average was asked for
        unpack_mean(pack_marker(members), members, 10)
    with pytest.raises(OtherView):  # a marker of another view
        unpack_mean(pack_marker(["asia", "eu"]), members, 10)
    with pytest.raises(OtherView):  # well formed, over other members: no strike
        unpack_mean(pack_mean(["asia", "eu"], ["asia"], frame), members, 10)
    with pytest.raises(PayloadError):  # a member count past the bound
        unpack_mean(struct.pack("<4sIH", b"LSM1", 0, 5000) + bytes(625) + frame, members, 10)
    assert struct.calcsize("<4sIH") == 10


def test_a_piece_s_encoder_keeps_the_residual_decay():
    """compression.ef_decay reaches the per-piece encoders of the sliced publish: the second
    encode sends x2 + decay * r1, so the residual is exactly that minus what it decoded to."""
    opts = codec_options("sign", block=256, scale_dtype="fp32", stochastic=False,
                         topk_fraction=0.1)  # fmt: skip
    pay = RangePayloads(shard=(0, P), owned=(0, P), codec="sign", delta_options=opts,
                        ef_decay=0.5)  # fmt: skip
    red = SlicedReduce(node=None, payloads=pay, site="asia", P=P, pool=None, pull_timeout_s=None)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(P, generator=g), torch.randn(P, generator=g)
    b, e = slice_bounds(P, 2, 1)
    red._encode(1, x1[b:e], b, e)
    r1 = pay.ef.residual[b:e].clone()
    _, _, sent = red._encode(1, x2[b:e], b, e)
    assert float(r1.abs().max()) > 0
    assert float((pay.ef.residual[b:e] - (x2[b:e] + 0.5 * r1 - sent)).abs().max()) < 1e-5


@pytest.mark.parametrize("feedback", [False, True])
def test_an_owner_s_error_feedback_sends_what_its_averages_left_out(feedback):
    """compression.mean_error_feedback: the owner adds its last coding error to the next
    average of the same piece, so the decoded averages of R equal rounds sum to R times the
    average less one residual (int4: at most half a step, amax / 14 of a block whose amax
    grows by that half step); without it every round repeats the same error. A piece that
    moves starts from a zero residual."""
    opts = codec_options("int4", block=256, scale_dtype="fp32", stochastic=False,
                         topk_fraction=0.1)  # fmt: skip
    pay = RangePayloads(shard=(0, P), owned=(0, P), codec="int8", mean_codec="int4",
                        mean_options=opts, mean_error_feedback=feedback)  # fmt: skip
    red = SlicedReduce(node=None, payloads=pay, site="asia", P=P, pool=None, pull_timeout_s=None)
    b, e = slice_bounds(P, 2, 1)
    val = torch.randn(e - b, generator=torch.Generator().manual_seed(5))
    R = 40
    total = sum(decode(red._encode_mean(val, b, e)).float() for _ in range(R))
    err = float((total / R - val).abs().max())
    once = float((decode(encode(val, "int4", **opts)).float() - val).abs().max())
    if feedback:
        assert err * R <= float(val.abs().max()) * 15 / 14 / 14 * 1.001, (err, once)
        assert err < once / 10
        moved = decode(red._encode_mean(val[1:], b + 1, e)).float()  # another piece: fresh
        assert torch.equal(moved, decode(encode(val[1:], "int4", **opts)).float())
    else:
        assert err == pytest.approx(once, rel=1e-6)  # the same error every round


def test_pieces_tile_the_range():
    for n in (1, 3, 4, 7):
        for lo, hi in ((0, P), (17, 1500), (1500, P)):
            ps = pieces(P, n, lo, hi)
            assert ps[0][1] == lo and ps[-1][2] == hi
            assert all(a[2] == b[1] for a, b in zip(ps, ps[1:], strict=False))


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["outer.diloco_reduce=ring"], ["outer.diloco_reduce='ring'", "sliced, full"]),
        (["compression.mean_codec=int3"], ["compression.mean_codec='int3'", "sign"]),
        (
            ["compression=int8", "compression.mean_codec=sign", "compression.stochastic=true"],
            ["compression.stochastic=true", "sign codec"],
        ),
    ],
)
def test_config_rejects_with_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        compose(["+site=eu", "outer=diloco", *overrides])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_config_default_is_sliced_and_both_reduces_take_fragments():
    assert compose(["+site=eu", "outer=diloco"]).outer.diloco_reduce == "sliced"
    for reduce in ("sliced", "full"):
        cfg = compose(["+site=eu", "outer=diloco", "outer.fragments=5",
                       f"outer.diloco_reduce={reduce}"])  # fmt: skip
        assert (cfg.outer.fragments, cfg.outer.diloco_reduce) == (5, reduce)


def test_the_frontier_preset_is_diloco_at_momentum_0_8_lr_1_3_and_the_mean_options_compose():
    cfg = compose(["+site=eu", "outer=diloco-frontier", "compression=sign",
                   "compression.mean_codec=sign", "compression.mean_error_feedback=true"])  # fmt: skip
    o, c = cfg.outer, cfg.compression
    assert (o.method, o.momentum, o.lr, o.nesterov, o.diloco_reduce) == (
        "diloco", 0.8, 1.3, True, "sliced")  # fmt: skip
    assert (c.codec, c.mean_codec, c.mean_error_feedback) == ("sign", "sign", True)
    # the default preset (ternary-sign) serves one-bit averages; a preset that names none
    # leaves them in the deltas' codec
    assert compose(["+site=eu"]).compression.mean_codec == "sign"
    assert compose(["+site=eu", "compression=int8"]).compression.mean_codec is None


def test_expected_pulls_count_the_partners_whose_slice_meets_this_range():
    """eu's rank [0, 1500) of members asia, eu, us: asia's slice [0, 1000) meets it (asia
    pulls a piece), us's [2000, 3001) does not; both pull eu's average of [1000, 1500)."""
    pay = RangePayloads(shard=(0, 1500), owned=(0, 1500), codec="none")
    s = SlicedReduce(node=None, payloads=pay, site="eu", P=P, pool=None, pull_timeout_s=None)
    assert s.expected_pulls(["asia", "us"]) == 1 + 2
    pay = RangePayloads(shard=(1500, 3002), owned=(1500, P), codec="none")
    s = SlicedReduce(node=None, payloads=pay, site="eu", P=P, pool=None, pull_timeout_s=None)
    assert s.expected_pulls(["asia", "us"]) == 1 + 2


# ------------------------------------------------------------------ streaming fragments

FRAGS = 5  # H = 5: one fragment's sync at every inner step


@pytest.mark.parametrize("codec", ["none", "sign"])
def test_fragments_reduce_each_fragment_sliced_and_phi_stays_one(codec):
    """outer.fragments with the sliced reduce: each sync cuts ITS fragment into the members'
    slices. Sites of 2 and 1 ranks (eu's rank boundary cuts a fragment) apply bitwise the same
    mean every sync, so phi is one; with codec none that mean is the full reduce's to fp32
    rounding (the same syncs, the same deltas)."""
    spec = {"asia": 1, "eu": 2, "us": 1}
    phis, crcs = {}, {}
    for reduce in ("sliced", "full") if codec == "none" else ("sliced",):
        sites = federation(spec, codec, reduce, fragments=FRAGS)
        try:
            train_round(sites, rounds=2)
            phis[reduce] = {s: site_cat(ls, lambda lp: lp.state.phi) for s, ls in sites.items()}
            crcs[reduce] = {s: [h["mean_crc"] for h in ls[0].history] for s, ls in sites.items()}
            for ls in sites.values():
                for lp in ls:
                    h = lp.history
                    assert [x["fragment"] for x in h] == list(range(FRAGS)) * 2, h
                    assert all(x["n"] == 3 and not x["dropped"] for x in h), h
        finally:
            close(sites)
        got = phis[reduce]
        assert all(torch.equal(p, got["asia"]) for p in got.values()), reduce
        assert crcs[reduce]["us"] == crcs[reduce]["asia"], reduce  # one rank each: one range
    if codec == "none":
        torch.testing.assert_close(phis["sliced"]["asia"], phis["full"]["asia"], rtol=0,
                                   atol=1e-6)  # fmt: skip


def test_a_fragment_s_sync_moves_two_n_minus_one_over_n_of_the_fragment():
    """codec none, 4 sites: one sync receives 2 (n - 1) / n of the FRAGMENT's fp32 delta (plus
    the averages' frame headers), 1 / F of a whole sliced round's."""
    spec = {"asia": 1, "eu": 1, "sa": 1, "us": 1}
    n = len(spec)
    sites = federation(spec, "none", fragments=FRAGS)
    try:
        train_round(sites)
        hist = {s: ls[0].history for s, ls in sites.items()}
    finally:
        close(sites)
    headers = (n - 1) * (40 + 8 + 1)
    for s, h in hist.items():
        for f, x in enumerate(h):
            lo, hi = f * P // FRAGS, (f + 1) * P // FRAGS
            S = 4 * (hi - lo)
            assert 2 * (n - 1) / n * S <= x["bytes_recv"] <= 2 * (n - 1) / n * S + headers + n * 4, (
                s, f, x["bytes_recv"], S)  # fmt: skip
