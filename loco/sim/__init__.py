"""A simulator of a NoLoCo federation: the real outer update, pairing, agreement and SWIM
membership on a simulated clock and network, with the inner steps replaced by noisy SGD on a
quadratic. ``python -m loco.sim sites=N rounds=R key=value...`` prints one JSON line.

Modules: :mod:`.options` (keys and their checks), :mod:`.links` (per-site latency and
bandwidth, ring and tree all-reduce times on the same links), :mod:`.membership` (SWIM members
on the simulated network), :mod:`.run` (the rounds), :mod:`.figures` (the docs' figures).
"""

from .options import SimOptions, parse_args
from .run import simulate

__all__ = ["SimOptions", "parse_args", "simulate"]
