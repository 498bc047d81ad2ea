"""The simulator's keys (``key=value``, Hydra style) and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loco.config import ConfigError, _choice, _fraction, _positive

METHODS = ("noloco", "diloco", "local")


@dataclass
class SimOptions:
    """One simulated run.

    Federation: ``sites``, ``rounds``, ``method``, ``seed``, NoLoCo's ``alpha beta gamma``,
    DiLoCo's ``outer_lr`` (Nesterov momentum 0.9). Inner model: ``dim`` coordinates of a
    quadratic with curvatures in [0.1, 1], ``inner_steps`` SGD steps of ``inner_lr`` per round,
    gradient noise ``noise`` and site heterogeneity ``hetero`` (spread of the sites' optima).
    Time and bytes: a model of ``params`` fp32 parameters (a payload is its delta and phi),
    ``compute_s`` of inner compute per round, a straggler (``straggler_x`` times slower) with
    probability ``straggler_p`` per site and round; per-site access latency (lognormal, median
    ``lat_ms``, sigma ``lat_sigma``; a link's latency is the sum of its ends') and bandwidth
    (lognormal, median ``bw_gbps``, sigma ``bw_sigma``; a link runs at its slower end).
    Membership: SWIM period ``heartbeat_s``, message ``drop`` probability. Failures: ``kill`` sites die at
    round ``kill_round``; ``restart`` of them come back ``restart_after`` rounds later from
    their last state with a new incarnation. ``pull_timeout_s``: how long a site waits for its
    partner before it steps alone.
    """

    sites: int = 16
    rounds: int = 30
    method: str = "noloco"
    seed: int = 0
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    outer_lr: float = 0.7
    dim: int = 64
    inner_steps: int = 10
    inner_lr: float = 0.1
    noise: float = 1.0
    hetero: float = 1.0
    params: float = 1e8
    compute_s: float = 10.0
    straggler_p: float = 0.02
    straggler_x: float = 3.0
    lat_ms: float = 20.0
    lat_sigma: float = 0.5
    bw_gbps: float = 1.0
    bw_sigma: float = 0.5
    heartbeat_s: float = 1.0
    drop: float = 0.0
    kill: int = 0
    kill_round: int = 10
    restart: int = 0
    restart_after: int = 5
    pull_timeout_s: float = 30.0

    def validate(self) -> None:
        """Raise ConfigError with one line naming the key and the fix."""
        _choice("method", self.method, METHODS)
        for key in ("sites", "rounds", "dim", "inner_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.sites > 100_000:
            raise ConfigError(f"sites={self.sites} is over the simulator's limit of 100000")
        for key in ("params", "compute_s", "lat_ms", "bw_gbps", "heartbeat_s", "pull_timeout_s",
                    "inner_lr", "straggler_x"):  # fmt: skip
            _positive(key, getattr(self, key))
        for key in ("noise", "hetero", "lat_sigma", "bw_sigma", "outer_lr", "alpha", "beta",
                    "gamma"):  # fmt: skip
            _positive(key, getattr(self, key), zero_ok=True)
        _fraction("straggler_p", self.straggler_p)
        _fraction("drop", self.drop)
        if not 0 <= self.kill < self.sites:
            raise ConfigError(f"kill={self.kill} must be in [0, sites={self.sites})")
        if not 0 <= self.restart <= self.kill:
            raise ConfigError(f"restart={self.restart} must be in [0, kill={self.kill}]")
        _positive("kill_round", self.kill_round, zero_ok=True)
        _positive("restart_after", self.restart_after)


def parse_args(argv: list[str]) -> SimOptions:
    """``key=value`` pairs into SimOptions (validated); ConfigError names a bad key or value."""
    fields = {f.name: f.type for f in dataclasses.fields(SimOptions)}
    opts = SimOptions()
    for arg in argv:
        key, eq, raw = arg.partition("=")
        if not eq or key not in fields:
            raise ConfigError(
                f"{arg!r} is not a key=value of the simulator; keys: {', '.join(fields)}"
            )
        kind = {"int": int, "float": float, "str": str}[str(fields[key])]
        try:
            setattr(opts, key, kind(float(raw)) if kind is int and "e" in raw else kind(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
    opts.validate()
    return opts
