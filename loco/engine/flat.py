"""The flat parameter space: one fixed, deterministic order of a model's trainable parameters.

Every trainable parameter gets a contiguous span ``[offset, offset + numel)`` of one global fp32
vector of length ``numel`` (the sum of the parameter sizes, tied parameters counted once). The
order is ``model.named_parameters()`` order, which is the module registration order and hence the
same on every rank and every site that builds the same model. Frozen parameters
(``requires_grad=False``) are not part of the space: they never change, so nothing about them is
sharded, reduced or exchanged.

A group of ``world`` ranks pads the vector to ``padded_numel(world)`` (a multiple of
``world * ALIGN``) and gives rank ``r`` the contiguous shard ``[r * S, (r + 1) * S)`` with
``S = padded_numel(world) // world``: that is :func:`loco.ranges.rank_range` on the padded size,
the one ownership rule the gossip layer uses too. A parameter may straddle two (or more) shards.
The padding depends on ``world`` and is never exchanged: :meth:`FlatLayout.owned_range` clips a
shard to the real ``numel``, and that global range is what the outer loop and checkpoints
address, so sites of different sizes agree on every index. :attr:`FlatLayout.hash` covers names, shapes and order, not
the world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from loco.ranges import owners as _owners
from loco.ranges import rank_range

ALIGN = 16
"""Shard sizes are multiples of this many elements (64 bytes in fp32)."""


@dataclass(frozen=True)
class ParamSpec:
    """Where one parameter lives in the flat space."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel

    @property
    def decay(self) -> bool:
        """Weight decay applies to matrices and embeddings only (see ``base.param_groups``)."""
        return len(self.shape) >= 2


def intersect(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """The intersection of two half-open ranges, or None when it is empty."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class FlatLayout:
    """The fixed order of a model's trainable parameters in one flat vector.

    Args:
        model: the model; its trainable parameters define the layout (tied parameters once).

    Attributes:
        specs: one :class:`ParamSpec` per trainable parameter, in flat order.
        params: the parameter objects, in the same order.
        numel: the real length P of the flat vector (no padding).
        hash: a hex digest of the names, shapes, dtypes and order; equal layouts have equal
            hashes on every machine, whatever the world size.
    """

    def __init__(self, model: nn.Module) -> None:
        specs: list[ParamSpec] = []
        params: list[nn.Parameter] = []
        off = 0
        digest = hashlib.sha256(b"loco-flat-v1\n")
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if not p.is_floating_point():
                raise ValueError(f"parameter {name} has dtype {p.dtype}; only float parameters")
            specs.append(ParamSpec(name, tuple(p.shape), off, p.numel()))
            params.append(p)
            digest.update(f"{name}:{tuple(p.shape)}:{off}\n".encode())
            off += p.numel()
        if not specs:
            raise ValueError("the model has no trainable parameter; nothing to optimize")
        digest.update(f"numel={off}\n".encode())
        self.specs = specs
        self.params = params
        self.numel = off
        self.hash = digest.hexdigest()[:16]
        self._index = {s.name: i for i, s in enumerate(specs)}

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, name: str) -> ParamSpec:
        return self.specs[self._index[name]]

    def index(self, name: str) -> int:
        """The position of parameter ``name`` in :attr:`specs` (KeyError if it is not in it)."""
        return self._index[name]

    # -- sharding -------------------------------------------------------------------------

    def padded_numel(self, world: int) -> int:
        """P padded up to a multiple of ``world * ALIGN``: every shard has the same size."""
        unit = world * ALIGN
        return -(-self.numel // unit) * unit

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        """Rank ``rank``'s shard ``[r*S, (r+1)*S)`` of the padded vector (may reach past P)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a group of {world} ranks")
        # the one ownership rule (loco.ranges, shared with gossip) on the padded size: the padded
        # size is a multiple of world, so r*padded//world == r*S exactly
        return rank_range(self.padded_numel(world), world, rank)

    def owned_range(self, rank: int, world: int) -> tuple[int, int]:
        """The real part of rank's shard, clipped to ``[0, P)``; may be empty (lo == hi)."""
        lo, hi = self.shard_range(rank, world)
        return min(lo, self.numel), min(hi, self.numel)

    def owners(self, span: tuple[int, int], world: int) -> list[tuple[int, int, int]]:
        """Split ``span`` by owner: a list of ``(rank, lo, hi)`` in rank order.

        :func:`loco.ranges.owners` on the padded size, the rule :meth:`shard_range` uses.
        """
        return _owners(self.padded_numel(world), world, span[0], span[1])

    def pieces(
        self, spans: list[tuple[int, int]], world: int
    ) -> list[tuple[int, int, int, int, int]]:
        """Split a buffer laid out as the concatenation of ``spans`` by owner.

        Returns ``(rank, buf_lo, buf_hi, global_lo, global_hi)`` per piece, in span order.
        """
        out, pos = [], 0
        for a, b in spans:
            for r, s, t in self.owners((a, b), world):
                out.append((r, pos + s - a, pos + t - a, s, t))
            pos += b - a
        return out

    def spans_of(self, indices: list[int]) -> list[tuple[int, int]]:
        """Maximal contiguous global spans covering the parameters ``indices`` (sorted)."""
        spans: list[tuple[int, int]] = []
        for i in sorted(indices, key=lambda i: self.specs[i].offset):
            s = self.specs[i]
            if spans and spans[-1][1] == s.offset:
                spans[-1] = (spans[-1][0], s.end)
            else:
                spans.append((s.offset, s.end))
        return spans

    @staticmethod
    def buffer_offset(spans: list[tuple[int, int]], g: int) -> int:
        """Where global index ``g`` sits in the concatenation of ``spans``."""
        pos = 0
        for a, b in spans:
            if a <= g < b:
                return pos + g - a
            pos += b - a
        raise AssertionError(f"index {g} is in no span")

    def decay_runs(self, span: tuple[int, int]) -> list[tuple[int, int, bool]]:
        """Maximal runs ``(lo, hi, decay)`` of real parameters inside ``span`` (global indices)."""
        runs: list[tuple[int, int, bool]] = []
        for s in self.specs:
            piece = intersect(span, (s.offset, s.end))
            if piece is None:
                continue
            if runs and runs[-1][1] == piece[0] and runs[-1][2] == s.decay:
                runs[-1] = (runs[-1][0], piece[1], s.decay)
            else:
                runs.append((*piece, s.decay))
        return runs

    # -- conversions ----------------------------------------------------------------------

    @torch.no_grad()
    def flatten(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The fp32 flat vector (length P) of ``tensors`` by name, or of the parameters."""
        if tensors is None:
            parts = [p.detach().reshape(-1) for p in self.params]
        else:
            parts = [tensors[s.name].detach().reshape(-1) for s in self.specs]
        return torch.cat([t.float().cpu() for t in parts])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (length >= P) shaped like each parameter, keyed by name."""
        if flat.numel() < self.numel:
            raise ValueError(
                f"flat vector has {flat.numel()} elements; the layout needs {self.numel}"
            )
        return {s.name: flat[s.offset : s.end].view(s.shape) for s in self.specs}
