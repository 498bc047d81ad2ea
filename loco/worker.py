"""One site: ``python -m loco.worker +site=NAME [overrides]`` (Hydra).

Runs ``site.nproc`` local ranks itself, or joins the ranks that ``torchrun`` started.
Exit statuses (the table in loco/errors.py): 0 done; 2 a configuration error, found before any
work, one line ``loco: error: ...``; 3 a run-time failure loco explains in one line
``loco: failed: ...`` (non-finite loss, unusable checkpoint at resume, no member to join);
1 anything unexpected, with its traceback; 130 Ctrl-C. ``LOCO_DEBUG=1``: tracebacks for all.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from loco.config import CONF_DIR, ConfigError, LocoConfig, compose, require_site, to_config
from loco.errors import EXIT_CONFIG, EXIT_CRASH, EXIT_INTERRUPTED, RankExited, exit_status, one_line

_NO_PREFLIGHT = (
    "-m",
    "--multirun",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
    "-sc",
)


_PEERS = re.compile(r"(\+{0,2}site\.peers)=\[(.*)\]", re.S)
_PEER = re.compile(r"[a-z][a-z0-9_-]{0,31}(=[^\s'\"\\,=]+)?")  # NAME or NAME=ADDRESS, no quotes


def quote_peers(args: list[str]) -> list[str]:
    """``args`` with a ``site.peers=[us=HOST:PORT,...]`` override (the README's form, whose
    ``=`` inside a list Hydra's grammar refuses) quoted as ``site.peers=['us=HOST:PORT',...]``.
    Only a list of bare ``NAME`` and ``NAME=ADDRESS`` entries, at least one with an address,
    is rewritten; every other argument (and an already quoted list) is returned unchanged."""
    out = []
    for a in args:
        m = _PEERS.fullmatch(a)
        entries = [e.strip() for e in m.group(2).split(",")] if m else []
        if entries and any("=" in e for e in entries) and all(map(_PEER.fullmatch, entries)):
            quoted = ",".join(f"'{e}'" for e in entries)
            a = f"{m.group(1)}=[{quoted}]"
        out.append(a)
    return out


def _fail(e: BaseException, status: int) -> None:
    print(one_line(e, status), file=sys.stderr, flush=True)
    sys.exit(status)


def preflight(cfg: LocoConfig) -> None:
    """The checks of ``cfg`` against this machine that need no work: the data files exist, a
    ``site.device=cuda`` site has its GPUs (and no offload at stage 0 across several of them),
    ``resume=peer`` has a gossip layer to join through. Raises ConfigError with one line naming
    the fix."""
    d = cfg.data
    if d.source in ("text", "bin"):
        for key, path in (("data.path", d.path), ("data.val_path", d.val_path)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{key}={path} is not a file; give an existing {d.source} file")
    if cfg.site is not None and cfg.site.nproc > 1:
        from loco.engine.options import check_offload_backend, offload_name
        from loco.launch import backend_for

        mode = offload_name(cfg.zero.offload) or "none"
        try:
            check_offload_backend(mode, cfg.zero.stage, backend_for(cfg), cfg.site.nproc)
        except ValueError:
            raise ConfigError(
                f"zero.offload={cfg.zero.offload} at zero.stage=0 on a {cfg.site.nproc}-GPU site: "
                "use zero.stage=1 (it shards the offloaded state) or zero.offload=false"
            ) from None
    if cfg.site is not None and cfg.site.device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ConfigError(
                "site.device=cuda but torch sees no CUDA device; use site.device=cpu or auto"
            )
        if cfg.site.nproc > have and "LOCAL_RANK" not in os.environ:
            raise ConfigError(
                f"site.nproc={cfg.site.nproc} ranks but {have} GPU(s) visible; lower site.nproc"
            )
    talks = cfg.outer.method != "local" and (cfg.gossip.insecure or bool(cfg.gossip.cert_dir))
    if cfg.resume == "peer" and not talks:
        raise ConfigError(
            "resume=peer needs the gossip layer: this site never talks (outer=local, or no "
            "gossip.cert_dir and gossip.insecure=false); use resume=latest or resume=none"
        )


# absolute: a relative path resolves against the package, not this file, when a console
# script (loco-worker) calls main(): conf/ is not a package
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _task(dcfg: DictConfig) -> None:
    """Run the site; a known failure exits with its status and one line (loco.errors), anything
    else goes up to Hydra, which prints its traceback and exits 1."""
    try:
        cfg = to_config(dcfg)
        require_site(cfg)
        preflight(cfg)
        from loco.launch import launch

        launch(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RankExited as e:
        sys.exit(e.status)  # the rank printed its own line
    except Exception as e:
        status = exit_status(e)
        if status == EXIT_CRASH or os.environ.get("LOCO_DEBUG"):
            raise
        _fail(e, status)


def main() -> None:
    """Entry point: validate the overrides (exit 2 before Hydra makes a run dir), then run."""
    sys.argv[1:] = quote_peers(sys.argv[1:])  # Hydra reads sys.argv itself
    args = sys.argv[1:]
    if not any(a.split("=")[0] in _NO_PREFLIGHT for a in args):
        # validate before Hydra creates run directories, so an error is one line and no work
        try:
            preflight(compose([a for a in args if not a.startswith("-")]))
        except ConfigError as e:
            _fail(e, EXIT_CONFIG)
    try:
        _task()
    except KeyboardInterrupt:
        print("loco: interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
