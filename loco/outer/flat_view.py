"""The engine's flat parameter space as the outer loop sees it.

The engine exposes it through its flat-state seam (``loco.engine.base.FlatEngine``:
``flat_range``, ``master_range()``, ``sync_params()``, ``gather_full()``); :class:`FlatView`
is the outer loop's window onto it.
"""

from __future__ import annotations

import torch

from loco.engine.base import FlatEngine


class FlatView:
    """This rank's shard ``[slo, shi)`` of the padded flat vector, its owned part ``[lo, hi)``
    (the shard clipped to the model's P), and read / write-back of the fp32 master values."""

    def __init__(self, engine: FlatEngine) -> None:
        self.engine = engine
        self.lo, self.hi = engine.flat_range
        self.slo, self.shi = engine.lo, engine.hi
        self.numel = engine.numel
        self.padded = engine.padded
        self.layout_hash = engine.layout_hash

    def master(self) -> torch.Tensor:
        """A writable fp32 tensor of ``[lo, hi)``; call :meth:`sync` after writing to it."""
        return self.engine.master_range()

    @torch.no_grad()
    def sync(self) -> None:
        """Propagate writes to :meth:`master` to the compute parameters. Collective."""
        self.engine.sync_params()

    def full(self) -> torch.Tensor:
        """The whole fp32 flat vector (length P) on the CPU on every rank. Collective."""
        return self.engine.gather_full()
