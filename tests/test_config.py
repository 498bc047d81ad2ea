"""Configuration errors: one line naming the key and what is allowed, before any work."""

from __future__ import annotations

import pytest

from loco.config import ConfigError, compose
from tests.workers import run_worker

# (overrides, words the single error line must contain)
BAD = [
    ([], ["+site=NAME", "asia, eu, us"]),
    (["+site=mars"], ["site", "'mars'", "asia, eu, us"]),
    (["+site=eu", "train.stpes=3"], ["train.stpes", "steps"]),
    (["+site=eu", "train.steps=abc"], ["train.steps", "Integer"]),
    (["+site=eu", "zero.stage=5"], ["zero.stage", "0, 1, 2, 3"]),
    (
        ["+site=eu", "model=huge"],
        ["model", "'huge'", "gpt2-124m, moe-small, moe-tiny, small, tiny"],
    ),
    (["+site=eu", "optim=adam"], ["optim", "adamw, sgd"]),
    (["+site=eu", "outer=fedavg"], ["outer", "diloco, diloco-frontier, local, noloco"]),
    (["+site=eu", "compression=zip"], ["compression", "int8"]),
    (["+site=eu", "foo=1"], ["'foo'", "train"]),
    (["+site=eu", "site.nproc=0"], ["site.nproc", "> 0"]),
    (["+site=eu", "train.lr=-1"], ["train.lr", "> 0"]),
    (["+site=eu", "resume=maybe"], ["resume", "latest"]),
    (["+site=eu", "site.listen=nowhere"], ["site.listen", "HOST:PORT"]),
    (["+site=eu", "data=text"], ["data.path"]),
    (["site.nproc=2"], ["+site=NAME"]),
    (["+site=eu", "outer.final_average=maybe"], ["outer.final_average"]),
    (["+site=eu", "outer.nesterov=sometimes"], ["outer.nesterov"]),
    (["+site=eu", "outer.consensus=phi"], ["outer.consensus", "momentum, weights"]),
    (["+site=eu", "outer.phi_landing=maybe"], ["outer.phi_landing"]),
    (["+site=eu", "outer.phi_landing_bits=1"], ["outer.phi_landing_bits", "2..8"]),
    (["+site=eu", "outer.phi_fallback_bits=9"], ["outer.phi_fallback_bits", "2..8"]),
    (["+site=eu", "outer.phi_landing_margin=0"], ["outer.phi_landing_margin", "> 0"]),
    (["+site=eu", "outer.phi_landing_codec=none"], ["outer.phi_landing_codec", "ternary"]),
    (["+site=eu", "outer.phi_landing_last_bits=9"], ["outer.phi_landing_last_bits", "2..8"]),
    (["+site=eu", "outer.phi_landing_last_codec=int3"], ["outer.phi_landing_last_codec"]),
    (["+site=eu", "outer.phi_lattice_block=300"], ["outer.phi_lattice_block", "512"]),
    (["+site=eu", "outer.phi_landing_last_meetings=-1"], ["outer.phi_landing_last_meetings"]),
    (["+site=eu", "outer.phi_lattice_block=128"], ["outer.phi_lattice_block", "256"]),
    (["+site=eu", "compression.ef_decay=1.5"], ["compression.ef_decay", "[0, 1]"]),
    (
        ["+site=eu", "compression=sign", "compression.stochastic=true"],
        ["compression.stochastic=false", "sign"],
    ),
    (
        [
            "+site=eu",
            "compression=topk",
            "compression.block=65536",
            "compression.topk_fraction=1e-5",
        ],
        ["compression.topk_fraction", "compression.block", "values per byte"],
    ),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) or "no-site" for o, _ in BAD])
def test_compose_rejects_with_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("overrides", [b[0] for b in BAD[:4]] + [["+site=eu", "model=huge"]])
def test_cli_error_is_one_line_and_nonzero(overrides, tmp_path):
    p = run_worker(overrides, tmp_path / "run", timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("loco: error: "), p.stderr
    assert not (tmp_path / "run").exists(), "a config error must stop the run before any work"


def test_sites_have_their_own_port_shard_and_peers():
    sites = {name: compose([f"+site={name}"]).site for name in ("eu", "us", "asia")}
    assert len({s.listen for s in sites.values()}) == 3
    assert sorted(s.shard for s in sites.values()) == [0, 1, 2]
    for name, s in sites.items():
        assert s.name == name and name not in s.peers and len(s.peers) == 2


def test_public_keys_accept_overrides():
    cfg = compose(
        [
            "+site=us",
            "model=small",
            "train.steps=7",
            "train.batch_size=3",
            "train.seq_len=64",
            "train.lr=0.01",
            "train.eval_every=5",
            "train.seed=9",
            "optim=sgd",
            "site.nproc=2",
            "site.listen=127.0.0.1:31000",
            "zero.stage=2",
            "outer=diloco",
            "outer.H=20",
            "compression=int4",
            "checkpoint.every=3",
            "checkpoint.dir=ck",
            "resume=latest",
            "gossip.insecure=true",
        ]
    )
    assert (cfg.model.size, cfg.train.steps, cfg.optim.name, cfg.site.nproc) == (
        "small",
        7,
        "sgd",
        2,
    )
    assert (cfg.zero.stage, cfg.outer.method, cfg.outer.H, cfg.compression.codec) == (
        2,
        "diloco",
        20,
        "int4",
    )
    assert (cfg.checkpoint.every, cfg.resume, cfg.gossip.insecure) == (3, "latest", True)


def test_gossip_keywords_map_onto_the_gossip_node():
    import inspect

    from loco.build import gossip_kwargs
    from loco.gossip import GossipNode

    kw = gossip_kwargs(
        compose(["+site=us", "gossip.insecure=true", "site.peers=[eu,'mars=10.1.2.3:7000']"])
    )
    assert kw["peers"] == {"eu": "127.0.0.1:29400", "mars": "10.1.2.3:7000"}
    params = inspect.signature(GossipNode).parameters
    assert set(kw) <= set(params), set(kw) - set(params)
    with pytest.raises(ConfigError, match="conf/site/pluto.yaml"):
        gossip_kwargs(compose(["+site=us", "site.peers=[pluto]"]))


@pytest.mark.parametrize(
    "overrides,lands",
    [
        (["outer.phi_landing=true"], True),
        (["outer.phi_landing=true", "outer.phi_lattice=false"], False),
        (["outer.phi_landing=true", "outer.phi_every=2"], False),
        (["outer.phi_landing=true", "outer.fragments=5"], False),
        (["outer.phi_landing=false"], False),
        (["outer=diloco", "outer.phi_landing=true"], False),
        (["outer.method=local"], False),
        ([], True),  # the default
    ],
)
def test_sequential_landing_applies_only_to_whole_lattice_rounds(overrides, lands):
    """Where the landing cannot run (exact phi, phi every other round, fragments) the two-way
    exchange does, and other methods move no phi, without an error: the landing is a way of
    sending NoLoCo's lattice phi, on by default."""
    from loco.build import lands as lands_of

    assert lands_of(compose(["+site=eu", *overrides]).outer) is lands


@pytest.mark.parametrize(
    "overrides,bits,margin,landing",
    [
        (["outer.phi_landing_bits=6", "outer.phi_lattice_bits=7"], 6, 3.0, True),
        (
            ["outer.phi_landing=false", "outer.phi_landing_bits=6", "outer.phi_lattice_bits=7"],
            7,
            5.0,
            False,
        ),
        (
            ["outer.phi_every=2", "outer.phi_landing_bits=6", "outer.phi_lattice_bits=7"],
            7,
            5.0,
            False,
        ),  # fmt: skip
    ],
)
def test_the_leaders_frame_has_the_landing_bits(overrides, bits, margin, landing):
    """Under the landing the leader's lattice frame takes ``outer.phi_landing_bits`` and
    ``outer.phi_landing_margin``, and the offsets ``outer.phi_landing_codec``; where the
    two-way exchange runs, ``outer.phi_lattice_bits`` and ``outer.phi_lattice_margin``."""
    from types import SimpleNamespace

    from loco.build import _payloads

    more = ["outer.phi_landing_margin=3", "outer.phi_lattice_margin=5",
            "outer.phi_landing_codec=sign"]  # fmt: skip
    cfg = compose(["+site=eu", *overrides, *more])
    flat = SimpleNamespace(slo=0, shi=1024, lo=0, hi=1000, padded=1024)
    p = _payloads(cfg, flat, SimpleNamespace(rank=0))
    assert p.lattice_bits == bits and (p.landing is not None) is landing
    assert p.lattice_margin == margin
    if landing:
        assert p.landing.codec == "sign" and "sign" in p.extra_options


def test_the_last_meeting_and_the_block_reach_the_payloads():
    """``outer.phi_landing_last_bits`` / ``_last_codec`` go to the landing (its codec
    registered for the pulls' bound), ``outer.phi_lattice_block`` to the payloads; unset, the
    last meeting is like the others."""
    from types import SimpleNamespace

    from loco.build import _payloads

    flat = SimpleNamespace(slo=0, shi=1024, lo=0, hi=1000, padded=1024)
    cfg = compose(["+site=eu", "outer.phi_landing_last_bits=6", "outer.phi_landing_last_meetings=2",
                   "outer.phi_landing_last_codec=normal4", "outer.phi_lattice_block=512"])  # fmt: skip
    p = _payloads(cfg, flat, SimpleNamespace(rank=0))
    p.landing.last_rounds = frozenset({78, 80})
    assert [p.landing.codec_at(t) for t in (77, 78, 79, 80)] == ["normal2", "normal4"] * 2
    assert (p.landing.bits_at(79, 4), p.landing.bits_at(80, 4)) == (4, 6)
    assert p.landing.last_meetings == 2
    assert "normal4" in p.extra_options and p.lattice_block == 512
    plain = _payloads(compose(["+site=eu"]), flat, SimpleNamespace(rank=0))
    plain.landing.last_rounds = frozenset({80})
    assert plain.landing.codec_at(80) == "normal2" and plain.landing.bits_at(80, 4) == 4
    assert plain.lattice_block == 256


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["outer.meet_every=2"], None),
        (["outer.meet_every=0"], "whole number >= 1"),
        (["outer.meet_first=-1"], "whole number >= 0"),
        (["outer.meet_every=1.5"], "outer.meet_every"),
        (["outer=diloco", "outer.meet_every=2"], "outer.method=noloco"),
        (["outer.meet_every=2", "outer.fragments=2"], "outer.fragments=1"),
    ],
)
def test_meet_every_is_for_noloco_whole_rounds(overrides, error):
    if error is None:
        assert compose(["+site=eu", *overrides]).outer.meet_every == 2
        return
    with pytest.raises(ConfigError, match=error):
        compose(["+site=eu", *overrides])


def test_the_closing_codec_reaches_the_closing_payloads_only():
    """``compression.closing_codec``: DiLoCo's closing payloads code their deltas and slice
    averages in it (the rounds' keep ``compression.codec``); an unknown codec is one clear
    error."""
    from types import SimpleNamespace

    from loco.build import _payloads

    flat = SimpleNamespace(slo=0, shi=1024, lo=0, hi=1000, padded=1024)
    cfg = compose(["+site=eu", "outer=diloco-frontier", "compression.closing_codec=int8"])
    rounds = _payloads(cfg, flat, SimpleNamespace(rank=0))
    closing = _payloads(cfg, flat, SimpleNamespace(rank=0), closing=True)
    assert (rounds.codec, rounds.mean_codec) == ("ternary", "sign")
    assert (closing.codec, closing.mean_codec) == ("int8", "int8")
    assert closing.ef is not None and not closing.mean_error_feedback
    piece = _payloads(cfg, flat, SimpleNamespace(rank=0), (0, 512), closing=True)
    assert (piece.slo, piece.shi, piece.codec) == (0, 512, "int8")
    with pytest.raises(ConfigError, match="compression.closing_codec"):
        compose(["+site=eu", "compression.closing_codec=int9"])


@pytest.mark.parametrize(
    "overrides,finer",
    [
        ([], True),  # ternary rounds: the closing in int8
        (["compression=sign"], True),
        (["compression=int4"], True),
        (["compression=int8"], False),  # as many bytes: the rounds' own
        (["compression=none"], False),  # exact rounds close exact, not in int8
        (["compression=bf16"], False),
        (["compression.closing_codec=null"], False),
        (["compression=int8", "compression.closing_codec=bf16"], True),
    ],
)
def test_the_closing_codec_applies_only_where_it_is_finer_than_the_rounds(overrides, finer):
    from loco.build import closing_is_finer

    assert closing_is_finer(compose(["+site=eu", *overrides]).compression) is finer
