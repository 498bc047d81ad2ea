"""One rank of a site: build its parts from the configuration, resume or join, train, summarize.

:func:`run_rank` is the composition root of a rank (the site's process group, if it has more than one
already up: ``loco.launch`` starts it). The mapping from configuration to objects is
``loco.build``; the run summary and the final model are ``loco.summary``.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loco import build
from loco import dist as ldist
from loco import summary as lsummary
from loco.checkpoint import Checkpoint, CheckpointError, capture, latest_checkpoint, restore
from loco.checkpoint.state import streams_of
from loco.config import ConfigError, LocoConfig
from loco.errors import JoinError
from loco.metrics import MetricsWriter
from loco.progress import Progress
from loco.site_comm import SiteComm
from loco.trainer import Trainer

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def join_live_run(
    cfg: LocoConfig, outer: Any, engine: Any, *, comm: SiteComm, metrics: Any, say: Any
) -> int:
    """``resume=peer`` (or, with ``join.auto``, no checkpoint while members are past round 0):
    take a live member's state through FetchState. Returns the step to start at (0: fresh).

    Raises ConfigError when ``resume=peer`` cannot talk at all, JoinError when no member served
    its state within ``join.timeout_s``."""
    from loco.outer.join import adopt, inner_streams, join, site_crc

    want = cfg.resume == "peer"
    if outer.node is None:
        if want:
            raise ConfigError(
                "resume=peer needs the gossip layer: this site never talks (outer=local, or no "
                "gossip.cert_dir and gossip.insecure=false); use resume=latest or resume=none"
            )
        return 0
    if not (want or cfg.join.auto):
        return 0
    joined = join(
        node=outer.node, lo=outer.flat.lo, hi=outer.flat.hi,
        inner_names=inner_streams(engine) if cfg.join.inner else (), min_round=0 if want else 1,
        timeout_s=cfg.join.timeout_s, fetch_timeout_s=cfg.join.fetch_timeout_s, comm=comm,
        say=say, reference=outer.state.phi,
    )  # fmt: skip
    if joined is None:
        if want:
            raise JoinError(
                f"resume=peer: no live member served its state within join.timeout_s="
                f"{cfg.join.timeout_s:g}; start a member first (site.peers) or raise join.timeout_s"
            )
        return 0
    start = adopt(joined, outer=outer, engine=engine)  # at the schedule's round boundary
    crc = site_crc(outer.state.phi, comm)
    what = "phi, momentum, master weights and optimizer moments" if joined.inner else "phi"
    say(
        f"joined the run from {joined.site} at round {joined.version} (step {start}): {what}, "
        f"{joined.bytes_recv:,} bytes on rank 0 in {joined.seconds:.1f} s"
    )
    if metrics is not None:
        metrics.log("join", step=start, round=joined.version, source=joined.site,
                    seconds=joined.seconds, bytes_recv=joined.bytes_recv, tries=joined.tries,
                    failed=",".join(joined.failed), inner=joined.inner, phi_crc=crc)  # fmt: skip
    return start


def gossip_plaintext(cfg: LocoConfig) -> bool:
    """True when this site talks gossip in plaintext: ``gossip.insecure`` and an outer method
    that talks (``local`` never does)."""
    return bool(cfg.gossip.insecure) and cfg.outer.method != "local"


@contextmanager
def config_checks() -> Iterator[None]:
    """Building the site from its configuration: a plain ValueError raised here (a component
    refusing its arguments: a corpus too small for ``data.num_shards``, ``site.device=cuda``
    without a GPU, ...) is a configuration error and is raised again as ConfigError (same
    message). CheckpointError and ConfigError pass unchanged."""
    try:
        yield
    except (ConfigError, CheckpointError):
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Parts:
    """What a rank trains with, built from the configuration (``loco.build``)."""

    comm: SiteComm
    device: torch.device
    corpus: Any
    model: Any
    engine: Any
    data: Any


def _say_for(site: str, rank: int) -> Say:
    """Rank 0 prints ``loco[site] msg`` on stderr; the other ranks stay quiet."""
    if rank != 0:
        return lambda msg: None
    return lambda msg: print(f"loco[{site}] {msg}", file=sys.stderr, flush=True)


def build_parts(cfg: LocoConfig, *, comm: SiteComm, local_rank: int, say: Say) -> Parts:
    """The device, corpus, model, engine and data of this rank. Collective over ``comm``
    (rank 0 builds the corpus cache, the others read it after a barrier). Raises ConfigError
    when a part refuses the configuration."""
    assert cfg.site is not None
    with config_checks():
        device = ldist.resolve_device(cfg.site.device, local_rank)
    seed_everything(cfg.train.seed)
    if gossip_plaintext(cfg):
        say(
            f"WARNING: gossip is PLAINTEXT and unauthenticated (gossip.insecure=true) on "
            f"{cfg.site.listen} (rank r: port + r): anyone who reaches it can read phi, momentum "
            "and weights and pose as a site; use mTLS (gossip.cert_dir) outside a trusted loopback"
        )
    with config_checks():
        # rank 0 builds the corpus cache; the others read it once it is complete
        if comm.rank == 0:
            corpus = build.corpus_from(cfg)
        comm.barrier()
        if comm.rank != 0:
            corpus = build.corpus_from(cfg)
        model = build.model_from(cfg, corpus).to(device)
        say(
            f"model {cfg.model.size}: {model.num_params():,} parameters; {comm.world} rank(s) on "
            f"{device.type}"
        )
        engine = build.engine_from(cfg, model, comm)
        data = build.data_from(cfg, corpus, comm)
    say(
        f"data {corpus.name}: shard {cfg.site.shard}/{cfg.data.num_shards} ({cfg.data.split}) "
        f"{data.shard_tokens:,} tokens; global batch {data.global_rows} x {cfg.train.seq_len}"
    )
    return Parts(comm, device, corpus, model, engine, data)


def find_resume(cfg: LocoConfig, ckpt: Any, say: Say) -> Path | None:
    """The checkpoint to resume from: the latest committed one under ``resume=latest``, else
    None (also when there is none yet: the rank starts fresh or joins)."""
    if cfg.resume != "latest":
        return None
    found = latest_checkpoint(ckpt.dir)
    if found is None:
        say(f"resume=latest: no checkpoint in {ckpt.dir}; starting fresh or joining")
    return found


def resume_or_join(cfg: LocoConfig, resume_from: Path | None, outer: Any, engine: Any, *,
                   comm: SiteComm, metrics: Any, say: Say) -> int:  # fmt: skip
    """The step to start at: from checkpoint ``resume_from`` when given, else from a live
    member (:func:`join_live_run`), else 0. Raises CheckpointError, ConfigError, JoinError."""
    if resume_from is None:
        return join_live_run(cfg, outer, engine, comm=comm, metrics=metrics, say=say)
    info = restore(Checkpoint(resume_from), engine=engine, outer=outer, comm=comm,
                   optimizer=cfg.checkpoint.optimizer)  # fmt: skip
    notes = f" ({'; '.join(info['notes'])})" if info["notes"] else ""
    say(f"resumed from {resume_from} at step {info['step']}{notes}")
    return info["step"]


def _step_hook(cfg: LocoConfig, outer: Any, metrics: Any) -> Callable[[int], None]:
    """The trainer's ``on_step_end``: the outer loop's boundary, then (when this site serves
    its state to joiners) the StateServer's publication."""
    if outer.node is None or not cfg.join.serve:
        return outer.on_step_end
    from loco.outer.join import StateServer

    serving = StateServer(outer=outer, inner=cfg.join.inner, metrics=metrics)
    serving.publish(outer.state.rounds)

    def on_step_end(done: int) -> None:
        outer.on_step_end(done)
        serving.after_step(done)

    return on_step_end


def _saver(cfg: LocoConfig, ckpt: Any, engine: Any, outer: Any, *, comm: SiteComm,
           metrics: Any) -> Callable[[int], None]:  # fmt: skip
    """The trainer's ``checkpoint``: this rank's ranges to host memory beside the next backward
    (fenced before the next optimizer step); its own file is written in the background."""

    def save(step: int) -> None:
        tensors, span, scalars = capture(engine, outer, comm=comm,
                                         optimizer=cfg.checkpoint.optimizer)  # fmt: skip
        rnd = outer.schedule.rounds_done(step)  # outer.H_first: the first rounds
        ckpt.save(step, tensors, range=span, scalars=scalars, overlap=True,
                  manifest={"round": rnd, "streams": streams_of(tensors)})  # fmt: skip
        if metrics:
            metrics.log("ckpt", step=step, round=rnd, stall_seconds=ckpt.stall_seconds)

    return save


def make_trainer(cfg: LocoConfig, parts: Parts, *, ckpt: Any, outer: Any, metrics: Any,
                 progress: Any, on_step_end: Callable[[int], None]) -> Trainer:  # fmt: skip
    """The inner loop, hooked to the checkpoint writer and the outer loop."""
    t = cfg.train
    return Trainer(
        engine=parts.engine, data=parts.data, steps=t.steps, lr=t.lr,
        warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, grad_accum=t.grad_accum,
        eval_every=t.eval_every, eval_batches=t.eval_batches, log_every=t.log_every,
        seq_len=t.seq_len, round_every=cfg.outer.H, round_of=outer.schedule.rounds_done,
        device=parts.device, comm=parts.comm,
        metrics=metrics,
        progress=progress, before_step=ckpt.fence, checkpoint_ready=outer.settled,
        on_step_end=on_step_end,
    )  # fmt: skip


def run_rank(cfg: LocoConfig, run_dir: Path, comm: SiteComm, local_rank: int) -> dict[str, Any]:
    """Train this rank of the site ``comm`` (its process group, if any, is up). Rank 0
    writes ``metrics.jsonl``, ``summary.json``, ``model.safetensors`` and ``report.md`` in
    ``run_dir``. Returns the run summary.

    Raises ConfigError when the configuration does not fit the data or the machine (before
    training), CheckpointError when ``resume=latest`` finds an unusable checkpoint, JoinError /
    TrainingError (loco.errors) for the run-time failures it explains."""
    assert cfg.site is not None
    site, rank = cfg.site.name, comm.rank
    torch.set_num_threads(build.threads_for(cfg, comm.world))
    say = _say_for(site, rank)
    parts = build_parts(cfg, comm=comm, local_rank=local_rank, say=say)
    ckpt = build.checkpoint_writer_from(cfg, run_dir, parts.engine, comm)
    resume_from = find_resume(cfg, ckpt, say)
    metrics: MetricsWriter | None = None
    if rank == 0:  # metrics.jsonl, and TensorBoard events of the same records
        events = run_dir / "tensorboard" if cfg.train.tensorboard else None
        metrics = MetricsWriter(run_dir / "metrics.jsonl", site=site, rank=rank, events=events)
        parts.corpus.save_tokenizer(run_dir)  # a BPE's file, for export and sample
    progress = None
    if rank == 0 and cfg.train.progress:
        progress = Progress(cfg.train.steps, prefix=f"loco[{site}] ")
    # the outer loop: rounds every outer.H steps (local never talks); its state is on this rank's
    # range, so it is checkpointed per rank beside the engine's shard
    with config_checks():
        outer = build.outer_from(cfg, parts.engine, comm, metrics=metrics, say=say)
    start = resume_or_join(cfg, resume_from, outer, parts.engine, comm=comm, metrics=metrics,
                           say=say)  # fmt: skip
    on_step_end = _step_hook(cfg, outer, metrics)
    outer.start(late=start > 0)
    save = _saver(cfg, ckpt, parts.engine, outer, comm=comm, metrics=metrics)
    trainer = make_trainer(cfg, parts, ckpt=ckpt, outer=outer, metrics=metrics,
                           progress=progress, on_step_end=on_step_end)  # fmt: skip
    try:
        summary = trainer.fit(start, checkpoint=save, ckpt_every=cfg.checkpoint.every)
        ckpt.wait()  # the last checkpoint is committed before the run ends
        outer.finish()
        summary.update(site=site, nproc=comm.world, params=parts.model.num_params(),
                       gossip_insecure=gossip_plaintext(cfg))  # fmt: skip
        summary.update(lsummary.outer_summary(cfg, outer, trainer.step - start))
        # what each rank's gossip server sent: with a site on several machines, each machine's
        summary["rank_bytes_sent"] = comm.all_gather_object(outer.totals["own_bytes_sent"])
        summary["hello_bytes"] = comm.sum([outer.totals["hello_bytes"]])[0]  # membership traffic
        summary["swim_bytes"] = comm.sum([outer.totals["swim_bytes"]])[0]  # datagrams, Swim.Key
        flat = lsummary.final_params(outer)  # collective
        summary["final_params_crc32"] = lsummary.params_crc32(flat) if flat is not None else None
        if rank == 0 and flat is not None:
            meta = {"run_id": cfg.run_id, "site": site, "step": trainer.step}
            lsummary.write_final_model(run_dir, parts.engine, parts.model, flat, meta)
    finally:
        outer.close()
    if rank == 0:
        _finish(run_dir, summary, metrics, site, say)
    return summary


def _finish(run_dir: Path, summary: dict[str, Any], metrics: Any, site: str, say: Say) -> None:
    """Rank 0's last writes: ``summary.json``, the closing line, ``metrics.jsonl`` closed, and
    ``report.md`` (plots from ``metrics.jsonl``)."""
    lsummary.write_summary(run_dir, summary)
    if summary["val_loss"] is not None:
        say(
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, final val loss "
            f"{summary['val_loss']:.4f}"
        )
    if metrics:
        metrics.close()
    from loco.report import try_write_report

    try_write_report(run_dir, title=f"loco site {site}")
