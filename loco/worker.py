"""One site: ``python -m loco.worker +site=NAME [overrides]`` (Hydra).

Runs ``site.nproc`` local ranks itself, or joins the ranks that ``torchrun`` started.
Configuration errors stop the run before any work with one line and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from loco.config import ConfigError, compose, require_site, to_config

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


def _fail(msg: str) -> None:
    print(f"loco: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _task(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        require_site(cfg)
        from loco.site import launch

        launch(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ValueError as e:
        if os.environ.get("LOCO_DEBUG"):
            raise
        _fail(str(e))


def main() -> None:
    args = sys.argv[1:]
    if not any(a.split("=")[0] in _NO_PREFLIGHT for a in args):
        # validate before Hydra creates run directories, so an error is one line and no work
        try:
            compose([a for a in args if not a.startswith("-")])
        except ConfigError as e:
            _fail(str(e))
    try:
        _task()
    except KeyboardInterrupt:
        print("loco: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
