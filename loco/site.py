"""One site's run: start or join its ranks, build everything, train, checkpoint, summarize."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco import build
from loco import dist as ldist
from loco.checkpoint import Checkpoint, CheckpointError, capture, latest_checkpoint, restore
from loco.checkpoint.state import streams_of
from loco.config import ConfigError, LocoConfig
from loco.errors import (
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_RUN,
    JoinError,
    RankExited,
    exit_status,
    one_line,
)
from loco.metrics import MetricsWriter
from loco.progress import Progress
from loco.trainer import Trainer

log = logging.getLogger(__name__)


FINAL_PARAMS_MAX = 50_000_000  # write final_params.pt (fp32 flat vector) up to this many


def outer_summary(cfg: LocoConfig, outer: Any, trainer: Trainer, start: int) -> dict[str, Any]:
    """Outer-loop figures of the run: rounds, bytes beside DDP's, utilization, consensus."""
    hist = outer.history
    steps = trainer.step - start
    return {
        "outer": cfg.outer.method,
        "codec": cfg.compression.codec if cfg.outer.method != "local" else "none",
        "rounds": len(hist),
        "rounds_dropped": sum(1 for h in hist if h["dropped"]),
        "bytes_sent": outer.totals["bytes_sent"],
        "bytes_recv": outer.totals["bytes_recv"],
        # DDP all-reduces about 2 x 4 bytes per parameter per inner step (ring, fp32)
        "ddp_bytes": 8.0 * outer.flat.numel * steps,
        "compute_utilization": (
            sum(h["compute_utilization"] for h in hist) / len(hist) if hist else 1.0
        ),
        # the final average (outer.final_average): sites averaged, their distance before it
        "final_average_n": outer.final["n"] if outer.final else None,
        "final_average_distance": outer.final["consensus_distance"] if outer.final else None,
        "consensus_distance": next(
            (
                h["consensus_distance"]
                for h in reversed(hist)
                if h["consensus_distance"] is not None
            ),
            None,
        ),
    }


def join_live_run(
    cfg: LocoConfig, outer: Any, engine: Any, *, rank: int, world: int, metrics: Any, say: Any
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
        timeout_s=cfg.join.timeout_s, fetch_timeout_s=cfg.join.fetch_timeout_s, rank=rank,
        world=world, say=say, reference=outer.state.phi,
    )  # fmt: skip
    if joined is None:
        if want:
            raise JoinError(
                f"resume=peer: no live member served its state within join.timeout_s="
                f"{cfg.join.timeout_s:g}; start a member first (site.peers) or raise join.timeout_s"
            )
        return 0
    start = adopt(joined, outer=outer, engine=engine, H=cfg.outer.H)
    crc = site_crc(outer.state.phi, world)
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_rank(
    cfg: LocoConfig, run_dir: Path, rank: int, world: int, local_rank: int
) -> dict[str, Any]:
    """Train this rank; the process group (if ``world > 1``) is already initialized.

    Raises ConfigError when the configuration does not fit the data or the machine (before
    training), CheckpointError when ``resume=latest`` finds an unusable checkpoint, JoinError /
    TrainingError (loco.errors) for the run-time failures it explains."""
    assert cfg.site is not None
    site = cfg.site.name
    torch.set_num_threads(build.threads_for(cfg, world))
    with config_checks():
        device = ldist.resolve_device(cfg.site.device, local_rank)
    seed_everything(cfg.train.seed)
    say = (
        (lambda msg: print(f"loco[{site}] {msg}", file=sys.stderr, flush=True))
        if rank == 0
        else (lambda msg: None)
    )
    if gossip_plaintext(cfg):
        say(
            f"WARNING: gossip is PLAINTEXT and unauthenticated (gossip.insecure=true) on "
            f"{cfg.site.listen} (rank r: port + r): anyone who reaches it can read phi, momentum "
            "and weights and pose as a site; use mTLS (gossip.cert_dir) outside a trusted loopback"
        )

    with config_checks():
        # rank 0 builds the corpus cache; the others read it once it is complete
        if rank == 0:
            corpus = build.corpus_from(cfg)
        if world > 1:
            dist.barrier()
        if rank != 0:
            corpus = build.corpus_from(cfg)
        model = build.model_from(cfg, corpus).to(device)
        say(
            f"model {cfg.model.size}: {model.num_params():,} parameters; {world} rank(s) on "
            f"{device.type}"
        )
        engine = build.engine_from(cfg, model)
        data = build.data_from(cfg, corpus, rank=rank, world=world)
    say(
        f"data {corpus.name}: shard {cfg.site.shard}/{cfg.data.num_shards} ({cfg.data.split}) "
        f"{data.shard_tokens:,} tokens; global batch {data.global_rows} x {cfg.train.seq_len}"
    )

    ckpt = build.checkpoint_writer_from(cfg, run_dir, engine, rank=rank, world=world)
    start = 0
    resume_from = None
    if cfg.resume == "latest":
        resume_from = latest_checkpoint(ckpt.dir)
        if resume_from is None:
            say(f"resume=latest: no checkpoint in {ckpt.dir}; starting fresh or joining")

    metrics = MetricsWriter(run_dir / "metrics.jsonl", site=site, rank=rank) if rank == 0 else None
    progress = (
        Progress(cfg.train.steps, prefix=f"loco[{site}] ")
        if rank == 0 and cfg.train.progress
        else None
    )

    # the outer loop: rounds every outer.H steps (local never talks); its state is on this rank's
    # range, so it is checkpointed per rank beside the engine's shard
    with config_checks():
        outer = build.outer_from(cfg, engine, rank=rank, world=world, metrics=metrics, say=say)
    if resume_from is not None:
        info = restore(Checkpoint(resume_from), engine=engine, outer=outer, rank=rank,
                       world=world, optimizer=cfg.checkpoint.optimizer)  # fmt: skip
        start = info["step"]
        notes = f" ({'; '.join(info['notes'])})" if info["notes"] else ""
        say(f"resumed from {resume_from} at step {start}{notes}")
    if resume_from is None:
        start = join_live_run(cfg, outer, engine, rank=rank, world=world, metrics=metrics, say=say)
    serving = None
    if outer.node is not None and cfg.join.serve:
        from loco.outer.join import StateServer

        serving = StateServer(outer=outer, inner=cfg.join.inner, metrics=metrics)
        serving.publish(outer.state.rounds)

    def on_step_end(done: int) -> None:
        outer.on_step_end(done)
        if serving is not None:
            serving.after_step(done)

    outer.start()

    def save(step: int) -> None:
        # this rank's ranges to host memory beside the next backward (fenced before the next
        # optimizer step); its own file is written in the background
        tensors, span, scalars = capture(engine, outer, rank=rank,
                                         optimizer=cfg.checkpoint.optimizer)  # fmt: skip
        rnd = step // cfg.outer.H
        ckpt.save(step, tensors, range=span, scalars=scalars, overlap=True,
                  manifest={"round": rnd, "streams": streams_of(tensors)})  # fmt: skip
        if metrics:
            metrics.log("ckpt", step=step, round=rnd, stall_seconds=ckpt.stall_seconds)

    trainer = Trainer(
        engine=engine,
        data=data,
        steps=cfg.train.steps,
        lr=cfg.train.lr,
        warmup_steps=cfg.train.warmup_steps,
        min_lr_ratio=cfg.train.min_lr_ratio,
        grad_accum=cfg.train.grad_accum,
        eval_every=cfg.train.eval_every,
        eval_batches=cfg.train.eval_batches,
        log_every=cfg.train.log_every,
        seq_len=cfg.train.seq_len,
        round_every=cfg.outer.H,
        tokens_are_bytes=corpus.tokens_are_bytes,
        device=device,
        metrics=metrics,
        progress=progress,
        before_step=ckpt.fence,
        checkpoint_ready=outer.settled,
        on_step_end=on_step_end,
    )
    try:
        summary = trainer.fit(start, checkpoint=save, ckpt_every=cfg.checkpoint.every)
        ckpt.wait()  # the last checkpoint is committed before the run ends
        outer.finish()
        summary.update(site=site, nproc=world, params=model.num_params(),
                       gossip_insecure=gossip_plaintext(cfg))  # fmt: skip
        summary.update(outer_summary(cfg, outer, trainer, start))
        flat = outer.flat.full() if outer.flat.numel <= FINAL_PARAMS_MAX else None
        if rank == 0 and flat is not None:
            torch.save(flat, run_dir / "final_params.pt")  # loco.local's consensus distance
    finally:
        outer.close()
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if summary["val_loss"] is not None:
            say(
                f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, final val loss {summary['val_loss']:.4f}"
            )
    if metrics:
        metrics.close()
    if rank == 0:  # report.md with plots, from metrics.jsonl
        from loco.report import try_write_report

        try_write_report(run_dir, title=f"loco site {site}")
    return summary


def _spawned(
    rank: int, cfg: LocoConfig, run_dir: Path, init_method: str, world: int, backend: str
) -> None:
    """One spawned local rank: a known failure prints its one line and exits with its status
    (loco.errors), which the parent takes over; anything else goes to the parent as a traceback."""
    try:
        ldist.init_group(
            backend=backend,
            rank=rank,
            world=world,
            init_method=init_method,
            checkpointing=cfg.zero.activation_checkpointing,
        )
        run_rank(cfg, run_dir, rank, world, rank)
    except Exception as e:
        status = exit_status(e)
        if status not in (EXIT_CONFIG, EXIT_RUN) or os.environ.get("LOCO_DEBUG"):
            raise  # torch passes the traceback to the parent (ProcessRaisedException): status 1
        print(one_line(e, status), file=sys.stderr, flush=True)
        sys.exit(status)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def backend_for(cfg: LocoConfig) -> str:
    assert cfg.site is not None
    gpu = cfg.site.device == "cuda" or (cfg.site.device == "auto" and torch.cuda.is_available())
    return "nccl" if gpu else "gloo"


def launch(cfg: LocoConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run the site: under torchrun join its ranks; else run ``site.nproc`` ranks here.

    Returns rank 0's summary (None on other torchrun ranks). Raises what ``run_rank`` raises;
    with spawned ranks, RankExited with the first failing rank's status (loco.errors: 2 or 3
    as that rank's failure, 1 for a rank killed or ended otherwise) or, for an unexpected
    exception in a rank, torch's ProcessRaisedException holding its traceback.
    """
    assert cfg.site is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    if ldist.under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != cfg.site.nproc and rank == 0:
            print(
                f"loco: torchrun started {world} ranks; site.nproc={cfg.site.nproc} is ignored",
                file=sys.stderr,
            )
        ldist.init_group(
            backend=backend_for(cfg),
            rank=rank,
            world=world,
            init_method="env://",
            checkpointing=cfg.zero.activation_checkpointing,
        )
        try:
            obj = [str(run_dir)]
            dist.broadcast_object_list(obj, src=0)  # every rank writes under rank 0's run dir
            return run_rank(cfg, Path(obj[0]), rank, world, int(os.environ["LOCAL_RANK"]))
        finally:
            dist.destroy_process_group()
    if cfg.site.nproc == 1:
        return run_rank(cfg, run_dir, 0, 1, 0)
    init = f"tcp://127.0.0.1:{ldist.free_port()}"
    args = (cfg, run_dir, init, cfg.site.nproc, backend_for(cfg))
    try:
        ldist.spawn(_spawned, cfg.site.nproc, args)
    except mp.ProcessExitedException as e:  # the first rank to fail; the others were ended
        if e.exit_code in (EXIT_CONFIG, EXIT_RUN):
            raise RankExited(e.error_index, e.exit_code) from None  # it printed its line
        why = f"signal {e.signal_name}" if e.signal_name else f"status {e.exit_code}"
        print(f"loco: rank {e.error_index} ended by {why}", file=sys.stderr, flush=True)
        raise RankExited(e.error_index, EXIT_CRASH) from None
    return json.loads((run_dir / "summary.json").read_text())
