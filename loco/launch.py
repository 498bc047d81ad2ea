"""Launching a site's ranks: join torchrun's, run one in this process, or spawn ``site.nproc``.

Each rank runs ``loco.rank.run_rank``. A spawned rank that fails in a known way prints its one
line and exits with its status (loco.errors); :func:`launch` turns the first failing rank's exit
into ``RankExited``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco import dist as ldist
from loco.config import LocoConfig
from loco.errors import EXIT_CONFIG, EXIT_CRASH, EXIT_RUN, RankExited, exit_status, one_line
from loco.rank import run_rank
from loco.site_comm import SiteComm
from loco.summary import read_summary


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
        bind_gpu(backend, rank)
        run_rank(cfg, run_dir, SiteComm(), rank)
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
    """The process-group backend of the site: NCCL on CUDA, gloo otherwise."""
    assert cfg.site is not None
    gpu = cfg.site.device == "cuda" or (cfg.site.device == "auto" and torch.cuda.is_available())
    return "nccl" if gpu else "gloo"


def bind_gpu(backend: str, local_rank: int) -> None:
    """Under NCCL, make ``local_rank``'s GPU this process's current device before the first
    collective: NCCL's object and small collectives stage through the current device, which
    is GPU 0 on every rank until set (``resolve_device`` sets it again, later, to the same)."""
    if backend == "nccl" and torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)


def _under_torchrun(cfg: LocoConfig, run_dir: Path) -> dict[str, Any] | None:
    """This torchrun rank: join the ``env://`` group and run under rank 0's run directory."""
    assert cfg.site is not None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.site.nproc and rank == 0:
        print(
            f"loco: torchrun started {world} ranks; site.nproc={cfg.site.nproc} is ignored",
            file=sys.stderr,
        )
    backend = backend_for(cfg)
    ldist.init_group(
        backend=backend,
        rank=rank,
        world=world,
        init_method="env://",
        checkpointing=cfg.zero.activation_checkpointing,
    )
    bind_gpu(backend, int(os.environ["LOCAL_RANK"]))
    try:
        comm = SiteComm()
        run_dir = Path(comm.broadcast_object(str(run_dir)))  # every rank writes under rank 0's
        return run_rank(cfg, run_dir, comm, int(os.environ["LOCAL_RANK"]))
    finally:
        dist.destroy_process_group()


def _spawn(cfg: LocoConfig, run_dir: Path) -> dict[str, Any]:
    """``site.nproc`` spawned ranks on a ``tcp://127.0.0.1`` rendezvous; rank 0's summary."""
    assert cfg.site is not None
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
    return read_summary(run_dir)


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
        return _under_torchrun(cfg, run_dir)
    if cfg.site.nproc == 1:
        return run_rank(cfg, run_dir, SiteComm.single(), 0)
    return _spawn(cfg, run_dir)
