"""Config to components, in one place: every library class takes plain keyword arguments."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loco.checkpoint import CheckpointWriter
from loco.config import LocoConfig
from loco.data import SiteData, load_corpus
from loco.data.corpus import Corpus
from loco.engine.base import Engine, OptimOptions
from loco.engine.zero import ZeroEngine
from loco.model import GPT, build_model
from loco.site_comm import SiteComm


def corpus_from(cfg: LocoConfig) -> Corpus:
    d = cfg.data
    return load_corpus(d.source, d.path, d.val_path, d.cache_dir, vocab_size=cfg.model.vocab_size,
                       tokenizer=d.tokenizer, bpe_vocab=d.vocab_size)  # fmt: skip


def model_from(cfg: LocoConfig, corpus: Corpus) -> GPT:
    m = cfg.model
    vocab = m.vocab_size or corpus.vocab_size
    if vocab < corpus.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab} is smaller than the data's vocabulary {corpus.vocab_size}"
        )
    return build_model(
        m.size,
        vocab_size=vocab,
        seq_len=cfg.train.seq_len,
        dropout=m.dropout,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        moe=m.moe.options(),
        ep=m.moe.ep,
    )


def optim_options(cfg: LocoConfig) -> OptimOptions:
    """The inner optimizer's options from ``optim.*`` (its name is ``optim.name``)."""
    o = cfg.optim
    return OptimOptions(
        weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        momentum=o.momentum,
        nesterov=o.nesterov,
    )


def engine_from(cfg: LocoConfig, model: torch.nn.Module, comm: SiteComm | None = None) -> Engine:
    """The site's ZeRO engine (``zero.stage`` 0 is replicated, gradients all-reduced)."""
    o, z = cfg.optim, cfg.zero
    bind_site = getattr(model, "bind_site", None)
    if bind_site is not None:  # an MoE model: its expert-parallel group among the site's ranks
        bind_site(comm if comm is not None else SiteComm())
    return ZeroEngine(
        model,
        optim=o.name,
        lr=cfg.train.lr,
        **optim_options(cfg).kwargs(),
        grad_clip=cfg.train.grad_clip,
        comm=comm,
        stage=z.stage,
        grad_accum=cfg.train.grad_accum,
        bucket_mb=z.bucket_mb,
        reduce_dtype=z.reduce_dtype,
        compute_dtype=z.mixed_precision,
        activation_checkpointing=z.activation_checkpointing,
        offload=z.offload,
        nvme_dir=z.nvme_dir,
        nvme_part_mb=z.nvme_part_mb,
        offload_params=z.offload_params,
        collective=z.collective,
        prefetch=z.prefetch,
        max_inflight=z.max_inflight,
    )


def data_from(cfg: LocoConfig, corpus: Corpus, comm: SiteComm) -> SiteData:
    """This rank's view of the site's data (its rows of every global batch)."""
    assert cfg.site is not None
    d, t = cfg.data, cfg.train
    return SiteData(
        corpus,
        site=cfg.site.name,
        shard=cfg.site.shard,
        num_shards=d.num_shards,
        split=d.split,
        chunk_tokens=d.chunk_tokens,
        val_fraction=d.val_fraction,
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        rank=comm.rank,
        world=comm.world,
        seed=t.seed,
    )


def checkpoint_writer_from(
    cfg: LocoConfig, run_dir: Path, engine, comm: SiteComm
) -> CheckpointWriter:
    """The site's universal checkpoint writer (``checkpoint.*``) with the manifest's fields."""
    import dataclasses
    import json

    from loco.checkpoint.format import layout_json
    from loco.checkpoint.state import aliases

    assert cfg.site is not None
    d = Path(cfg.checkpoint.dir)
    meta = {
        "run_id": cfg.run_id,
        "site": cfg.site.name,
        "zero_stage": cfg.zero.stage,
        "optim": cfg.optim.name,
        "layout": layout_json(engine.layout),
        "aliases": aliases(engine.model, engine.layout),
        # batches are a pure function of (seed, site, shard, step): the step is the state
        "sampler": {
            "kind": "stateless",
            "seed": cfg.train.seed,
            "site": cfg.site.name,
            "shard": cfg.site.shard,
            "num_shards": cfg.data.num_shards,
        },
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    return CheckpointWriter(d if d.is_absolute() else run_dir / d, comm=comm,
                            keep=cfg.checkpoint.keep, meta=meta)  # fmt: skip


def threads_for(cfg: LocoConfig, world: int) -> int:
    if cfg.train.threads:
        return cfg.train.threads
    return max(1, (os.cpu_count() or 1) // world)


def peer_addresses(cfg: LocoConfig) -> dict[str, str]:
    """``site.peers`` as {name: host:port}. An entry is ``NAME=HOST:PORT``, or a bare ``NAME``
    whose address is the ``listen`` of ``conf/site/NAME.yaml``."""
    from omegaconf import OmegaConf

    from loco.config import CONF_DIR, ConfigError, available

    assert cfg.site is not None
    out: dict[str, str] = {}
    for entry in cfg.site.peers:
        name, sep, addr = entry.partition("=")
        if not sep:
            path = CONF_DIR / "site" / f"{name}.yaml"
            if not path.exists():
                raise ConfigError(
                    f"site.peers names {name!r}, which has no conf/site/{name}.yaml; give NAME=HOST:PORT "
                    f"or one of: {', '.join(available('site'))}"
                )
            addr = str(OmegaConf.load(path).listen)
        out[name] = addr
    return out


def gossip_kwargs(cfg: LocoConfig) -> dict:
    """Keyword arguments of ``loco.gossip.GossipNode`` from ``gossip.*`` and ``site.*``."""
    import dataclasses

    assert cfg.site is not None
    return dict(
        site=cfg.site.name,
        listen=cfg.site.listen,
        peers=peer_addresses(cfg),
        run_id=cfg.run_id,
        seed=cfg.train.seed,
        **dataclasses.asdict(cfg.gossip),
    )


def outer_from(
    cfg: LocoConfig,
    engine: Engine,
    comm: SiteComm,
    *,
    metrics=None,
    say=None,
):
    """The outer round driver of this rank (``outer.*``, ``compression.*``, ``gossip.*``).

    ``local`` builds no gossip node: it never talks. The node publishes this rank's shard of the
    engine's padded flat vector, so its flat size is the padded size.
    """
    from functools import partial

    from loco.outer import build_outer
    from loco.outer.flat_view import FlatView
    from loco.outer.loop import OuterLoop
    from loco.testing import faults as lfaults

    assert cfg.site is not None
    o = cfg.outer
    flat = FlatView(engine)
    nesterov = o.nesterov if o.nesterov is not None else o.method == "diloco"
    step = build_outer(o.method, alpha=o.alpha, beta=o.beta, gamma=o.gamma, lr=o.lr,
                       momentum=o.momentum, nesterov=nesterov, consensus=o.consensus)  # fmt: skip
    node = payloads = None
    closers: list = []
    faults = lfaults.load(cfg.site.name)  # drills only: $LOCO_FAULTS
    if _talks(cfg, say):
        node = _gossip_node(cfg, flat, comm, closers, blocked=faults.blocked if faults else None)
        payloads = _payloads(cfg, flat, comm)
    loop = OuterLoop if faults is None else partial(lfaults.FaultyOuterLoop, faults=faults)
    return loop(
        step=step, flat=flat, H=o.H, steps=cfg.train.steps, node=node, payloads=payloads,
        site=cfg.site.name, all_live=o.method == "diloco", tau=o.tau, mix=o.mix, merge=o.merge,
        comm=comm,
        metrics=metrics, pull_timeout_s=cfg.gossip.pull_timeout_s,
        join_timeout_s=o.join_timeout_s, linger_s=min(10.0, cfg.gossip.pull_timeout_s), say=say,
        final_average=o.final_average, final_lattice=o.final_lattice, closers=closers,
        fragments=o.fragments, fragment_tau=o.fragment_tau, diloco_reduce=o.diloco_reduce,
        H_first=tuple(o.H_first), meet_every=o.meet_every, meet_first=o.meet_first,
        payloads_for=partial(_payloads, cfg, flat, comm) if payloads is not None else None,
        closing_for=(partial(_payloads, cfg, flat, comm, closing=True)
                     if payloads is not None and closing_is_finer(cfg.compression) else None),
    )  # fmt: skip


def _talks(cfg: LocoConfig, say) -> bool:
    """Whether this site gossips: its outer method talks and it has credentials (or is
    plaintext). A talking method without either trains alone, with one warning."""
    import warnings

    method = cfg.outer.method
    if method == "local":
        return False
    if cfg.gossip.insecure or cfg.gossip.cert_dir:
        return True
    msg = (
        f"outer={method} but no gossip.cert_dir (and gossip.insecure=false): this site "
        "trains ALONE, every round is the local step (n = 1). To join the other sites make "
        "certificates with `python -m loco.certs --out DIR --sites ...` and set "
        "gossip.cert_dir=DIR/<site> (or gossip.insecure=true on loopback); python -m loco.local "
        "does this for you"
    )
    if say is not None:
        say(f"WARNING: {msg}")
    else:
        warnings.warn(msg, stacklevel=3)
    return False


def _gossip_node(cfg: LocoConfig, flat, comm: SiteComm, closers: list, blocked=None):
    """This rank's started gossip node (behind the emulated WAN when ``wan.*`` is set); its
    closers are added to ``closers``. ``blocked``: drills only, links to cut."""
    from loco.config import ConfigError
    from loco.gossip import GossipNode
    from loco.gossip.rank_address import rank_binds

    kw = gossip_kwargs(cfg)
    try:
        kw["bind"] = rank_binds(cfg.site.listen, comm.rank, cfg.site.advertise,
                                comm.all_gather_object)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the mailbox's window and a ban count gossip round ids: F of them per round with fragments
    kw["keep_rounds"] *= cfg.outer.fragments
    kw["ban_rounds"] *= cfg.outer.fragments
    node = GossipNode(
        rank=comm.rank, nproc=comm.world, flat_size=flat.padded, layout_hash=flat.layout_hash,
        **kw,
    )  # fmt: skip
    closers.append(node.close)
    if blocked is not None:
        from loco.testing.gossip_faults import cut_links

        cut_links(node.client, blocked)
    w = cfg.wan
    if w.rtt_ms > 0 or w.bandwidth_mbit > 0 or w.jitter_ms > 0 or w.loss > 0:
        # the proxies' addresses are in place before the first Hello is answered, so no
        # partner caches a direct address that bypasses the emulated link
        node.server.bind()
        closers.insert(0, _wan_proxy(cfg, node, comm))
    elif comm.world > 1:  # every rank's real address: its own host when ranks span machines
        node.server.bind()
        node.server.set_rank_addresses(comm.all_gather_object(node.server.address))
    node.start()
    return node


def lands(o) -> bool:
    """Whether NoLoCo's rounds use the sequential landing: ``outer.phi_landing`` where it
    applies (the lattice phi of whole rounds, every round)."""
    return bool(o.phi_landing and o.method == "noloco" and o.phi_lattice and o.fragments == 1
                and o.phi_every == 1)  # fmt: skip


def _codec_keywords(c) -> dict:
    """The ``compression.*`` keywords :func:`loco.outer.exchange.codec_options` takes."""
    return dict(block=c.block, scale_dtype=c.scale_dtype, stochastic=c.stochastic,
                topk_fraction=c.topk_fraction, sparse_k=c.sparse_k,
                sparse_bits=c.sparse_bits)  # fmt: skip


def closing_is_finer(c) -> bool:
    """Whether ``compression.closing_codec`` sends more bytes per value than the rounds' codec
    (the closing syncs then travel in it); else they keep the rounds' (``none`` rounds close
    exact, not in the int8 default)."""
    from loco.compress import make_codec
    from loco.outer.exchange import codec_options

    if not c.closing_codec:
        return False
    opts = _codec_keywords(c)
    rounds, closing = (make_codec(name, **codec_options(name, **opts)).bytes_per_param()
                       for name in (c.codec, c.closing_codec))  # fmt: skip
    return closing > rounds


def _payloads(cfg: LocoConfig, flat, comm: SiteComm, span: tuple[int, int] | None = None,
              closing: bool = False):  # fmt: skip
    """This rank's encoder and decoder of round payloads (``compression.*``); with ``span``,
    of that piece of its owned range only (a streaming fragment's); ``closing``: of DiLoCo's
    closing syncs (``compression.closing_codec`` for the delta and the slice averages)."""
    from dataclasses import replace

    from loco.outer.exchange import RangePayloads, codec_options

    c, o = cfg.compression, cfg.outer
    if closing:
        c = replace(c, codec=c.closing_codec, mean_codec=c.closing_codec,
                    mean_error_feedback=False)  # fmt: skip
    opts = _codec_keywords(c)
    landing = span is None and lands(o)  # the leader's frame has its own bits
    payloads = RangePayloads(
        shard=span or (flat.slo, flat.shi), owned=span or (flat.lo, flat.hi), codec=c.codec,
        phi_codec=c.phi_codec, delta_options=codec_options(c.codec, **opts),
        phi_options=codec_options(c.phi_codec, **opts), mean_codec=c.mean_codec,
        mean_options=codec_options(c.mean_codec or c.codec, **opts),
        mean_error_feedback=c.mean_error_feedback,
        error_feedback=c.error_feedback,
        ef_decay=c.ef_decay, seed=cfg.train.seed * 1009 + comm.rank, flat_size=flat.padded, phi_lattice=o.phi_lattice,
        phi_lattice_window=o.phi_lattice_window,
        phi_lattice_bits=o.phi_landing_bits if landing else o.phi_lattice_bits,
        phi_lattice_margin=o.phi_landing_margin if landing else o.phi_lattice_margin,
        phi_every=o.phi_every, phi_sketch_margin=o.phi_landing_sketch_margin,
        phi_lattice_rotate=o.phi_lattice_rotate, phi_fallback_bits=o.phi_fallback_bits,
        phi_lattice_block=o.phi_lattice_block,
    )  # fmt: skip
    if landing:
        from loco.outer.landing import Landing

        last = o.phi_landing_last_codec or o.phi_landing_codec
        payloads.landing = Landing(payloads, codec=o.phi_landing_codec,
                                   options=codec_options(o.phi_landing_codec, **opts),
                                   window=o.phi_landing_window, last_codec=last,
                                   last_options=codec_options(last, **opts),
                                   last_bits=o.phi_landing_last_bits,
                                   last_meetings=o.phi_landing_last_meetings)  # fmt: skip
    return payloads


def _wan_proxy(cfg: LocoConfig, node, comm: SiteComm):
    """Emulated WAN (``wan.*``) on this rank's inbound link: a delay/rate TCP proxy in front of
    its gossip server, advertised by Hello as the rank's address, so every pull of this rank's
    payload crosses it (Hello and heartbeats go direct). Returns the proxy's ``stop``."""
    from loco.gossip.netem import DelayProxy

    w = cfg.wan
    host = node.server.address.rpartition(":")[0]
    proxy = DelayProxy(node.server.address, listen=f"{host}:0", delay_s=w.rtt_ms / 2000.0,
                       rate_bps=w.bandwidth_mbit * 1e6, jitter_s=w.jitter_ms / 2000.0,
                       loss=w.loss, seed=cfg.train.seed * 1009 + comm.rank)  # fmt: skip
    node.server.set_rank_addresses(comm.all_gather_object(proxy.start()))
    # at the end, give what the server already handed to the proxy time to cross the link:
    # one RTT plus a round's worth of this rank's payload (<= 8 bytes per value) at the rate
    lo, hi = node.lo, node.hi
    drain_s = w.rtt_ms / 1000.0 + (
        (hi - lo) * 8 * 8 / (w.bandwidth_mbit * 1e6) if w.bandwidth_mbit else 0.0
    )

    def stop() -> None:
        import time

        time.sleep(min(drain_s, 30.0))
        proxy.stop()

    return stop
