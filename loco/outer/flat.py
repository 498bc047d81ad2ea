"""The engine's flat parameter space as the outer loop sees it.

``ZeroEngine`` exposes it directly (``flat_range``, ``master_range()``, ``sync_params()``);
:class:`FlatView` wraps that, and also a plain (replicated, unsharded) engine, whose whole
vector is every rank's range.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters


class FlatView:
    """This rank's shard ``[slo, shi)`` of the padded flat vector, its owned part ``[lo, hi)``
    (the shard clipped to the model's P), and read / write-back of the fp32 master values."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._zero = hasattr(engine, "master_range")
        if self._zero:
            self.lo, self.hi = engine.flat_range
            self.slo, self.shi = engine.lo, engine.hi
            self.numel = engine.numel
            self.padded = engine.padded
            self.layout_hash = engine.layout_hash
        else:
            params = [p for p in engine.model.parameters() if p.requires_grad]
            self._params = params
            self.numel = sum(p.numel() for p in params)
            self.lo, self.hi = 0, self.numel
            self.slo, self.shi, self.padded = 0, self.numel, self.numel
            shapes = ",".join(f"{tuple(p.shape)}" for p in params)
            import hashlib

            self.layout_hash = hashlib.sha256(shapes.encode()).hexdigest()[:16]
            self._vec: torch.Tensor | None = None

    def master(self) -> torch.Tensor:
        """A writable fp32 tensor of ``[lo, hi)``; call :meth:`sync` after writing to it."""
        if self._zero:
            return self.engine.master_range()
        self._vec = parameters_to_vector([p.detach() for p in self._params]).float()
        return self._vec

    @torch.no_grad()
    def sync(self) -> None:
        """Propagate writes to :meth:`master` to the compute parameters. Collective."""
        if self._zero:
            self.engine.sync_params()
        elif self._vec is not None:
            vector_to_parameters(self._vec, self._params)

    def full(self) -> torch.Tensor:
        """The whole fp32 flat vector (length P) on the CPU. Collective for ZeroEngine."""
        if self._zero:
            return self.engine.gather_full()
        return parameters_to_vector([p.detach() for p in self._params]).float().cpu()
