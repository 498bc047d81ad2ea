"""Config to components, in one place: every library class takes plain keyword arguments."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from loco.checkpoint import SimpleCheckpointer
from loco.config import LocoConfig
from loco.data import SiteData, load_corpus
from loco.data.corpus import Corpus
from loco.engine.base import Engine
from loco.engine.zero import ZeroEngine
from loco.model import GPT, build_model


def corpus_from(cfg: LocoConfig) -> Corpus:
    d = cfg.data
    return load_corpus(d.source, d.path, d.val_path, d.cache_dir, vocab_size=cfg.model.vocab_size)


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
    )


def engine_from(
    cfg: LocoConfig, model: torch.nn.Module, group: dist.ProcessGroup | None = None
) -> Engine:
    """The site's ZeRO engine (``zero.stage`` 0 is replicated, gradients all-reduced)."""
    o, z = cfg.optim, cfg.zero
    return ZeroEngine(
        model,
        optim=o.name,
        lr=cfg.train.lr,
        weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        momentum=o.momentum,
        nesterov=o.nesterov,
        grad_clip=cfg.train.grad_clip,
        group=group,
        stage=z.stage,
        grad_accum=cfg.train.grad_accum,
        bucket_mb=z.bucket_mb,
        reduce_dtype=z.reduce_dtype,
        compute_dtype=z.mixed_precision,
        activation_checkpointing=z.activation_checkpointing,
        offload=z.offload,
    )


def data_from(cfg: LocoConfig, corpus: Corpus, *, rank: int, world: int) -> SiteData:
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
        rank=rank,
        world=world,
        seed=t.seed,
    )


def checkpointer_from(cfg: LocoConfig, run_dir: Path) -> SimpleCheckpointer:
    d = Path(cfg.checkpoint.dir)
    return SimpleCheckpointer(d if d.is_absolute() else run_dir / d, keep=cfg.checkpoint.keep)


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
