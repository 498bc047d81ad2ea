"""A whole federation on this machine: ``python -m loco.local [overrides]``.

The command line of ``loco.federation.run_federation``: every site of ``federation.sites`` as a
real ``loco.worker`` process on loopback, each in ``<run dir>/<site>/``; one summary line per
site at the end. ``site.*`` overrides go to the workers only (this process composes the
configuration without a site); the rest go to every worker unchanged. ``-m`` runs a Hydra
multirun where each job is a whole federation; the sweep ends with one table of its jobs
(``loco.sweep``). Exit status: 0 every site done, 1 a site failed, 2 a configuration error
(one line, before any work), 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from loco.config import CONF_DIR, ConfigError, compose, to_config
from loco.federation import run_federation
from loco.sweep import Sweep

_NO_PREFLIGHT = ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c")


def _hydra_task(site_overrides: list[str], sweep: Sweep) -> Callable[[], None]:
    """The Hydra entry point of one job: run its federation; in a multirun, add its row to
    ``sweep``, else exit 130 (interrupted) or 1 (a site failed)."""

    # absolute: a relative path resolves against the package, not this file, when the
    # console script loco-local calls main(): conf/ is not a package
    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def task(dcfg: DictConfig) -> None:
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task) + site_overrides
        to_config(dcfg)  # validated here too (multirun jobs)
        res = run_federation(overrides, Path(hc.runtime.output_dir))
        bad = [r["site"] for r in res["sites"] if r.get("exit") != 0]
        if hc.mode is not None and str(hc.mode).endswith("MULTIRUN"):
            sweep.add(list(hc.overrides.task), res, Path(hc.sweep.dir))
        elif res["interrupted"] or bad:
            sys.exit(130 if res["interrupted"] else 1)

    return task


def main() -> None:
    """Entry point: validate the overrides (exit 2 before Hydra makes a run dir), run the
    federation (or the sweep's federations), and print the sweep's table after a multirun."""
    args = sys.argv[1:]
    # site.* keys are for the workers: this process composes the config without a site
    site_overrides = [a for a in args if a.lstrip("+~").startswith(("site.", "site="))]
    args = [a for a in args if a not in site_overrides]
    sys.argv[1:] = args
    if not any(a in _NO_PREFLIGHT for a in args):
        try:
            compose([a for a in args if not a.startswith("-")], need_site=False)
        except ConfigError as e:
            print(f"loco: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    sweep = Sweep()
    try:
        _hydra_task(site_overrides, sweep)()
    except ConfigError as e:
        print(f"loco: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if sweep.rows:
        print("\nsweep:\n" + sweep.write(), flush=True)


if __name__ == "__main__":
    main()
