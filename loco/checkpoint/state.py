"""What one rank puts into a checkpoint, and how a rank of any site size takes it back.

A rank saves, on its own flat range ``[lo, hi)`` (``engine.flat_range``, the same for every
ZeRO stage): the fp32 master weights, the optimizer moments (``optim.*``) and step, the outer
state (``outer.phi``, ``outer.momentum``, rounds), the error-feedback residual with its call
counter and the sequential landing's miss; plus its RNG states. Rank 0 adds the frozen
parameters and buffers (replicated). The data sampler is stateless (a batch is a pure function
of seed, site and step), so the manifest records its inputs and the step to continue from.

The range streams, their scalars and how they load are :class:`loco.state.RankState`'s (the
names are the checkpoint's, shared with joins); this module adds the RNG states, frozen
parameters and buffers, and the file transport.

:func:`restore` reads this rank's range from whichever saved files intersect it. Same rank
count: the state is exactly what was saved, so training continues bit-identically. Another
rank count: per-rank scalars and RNG states come from saved rank ``rank % saved_world``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from loco.checkpoint.format import CheckpointError
from loco.checkpoint.reader import Checkpoint
from loco.site_comm import SiteComm
from loco.state import (
    EF_CALLS,
    EF_RESIDUAL,
    LANDING_MISS,
    MASTER,
    MOMENTUM,
    OPTIM_STEP,
    OUTER_ROUNDS,
    PHI,
    RankState,
    is_range_stream,
)


def _rng_scalars() -> dict[str, Any]:
    v, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "rng_python": [v, list(mt), gauss],
        "rng_numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }


def aliases(model: torch.nn.Module, layout: Any) -> dict[str, str]:
    """``state_dict`` names that are the same tensor as a layout parameter (tied weights)."""
    name_of = {id(p): s.name for s, p in zip(layout.specs, layout.params, strict=True)}
    out = {}
    for n, t in model.state_dict(keep_vars=True).items():
        base = name_of.get(id(t))
        if base is not None and base != n:
            out[n] = base
    return out


def capture(
    engine: Any, outer: Any = None, *, comm: SiteComm, optimizer: bool = True
) -> tuple[dict[str, torch.Tensor], tuple[int, int], dict[str, Any]]:
    """This rank's entries (live views: the writer copies them), its range, its scalars
    (site rank 0 adds the frozen parameters and buffers).

    The range streams and their scalars are :class:`loco.state.RankState`'s, under its names."""
    state = RankState(engine, outer)
    tensors = state.streams(state.names(optimizer=optimizer))
    scalars: dict[str, Any] = dict(state.scalars(optimizer=optimizer))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scalars.update(_rng_scalars())
    if comm.rank == 0:
        for n, p in engine.model.named_parameters():
            if not p.requires_grad:
                tensors[f"frozen.{n}"] = p.detach()
        for n, b in engine.model.named_buffers():
            tensors[f"buffer.{n}"] = b.detach()
    return tensors, (state.lo, state.hi), scalars


def streams_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The range streams among ``tensors`` (a manifest's ``streams``), in their order."""
    return [k for k in tensors if is_range_stream(k)]


@torch.no_grad()
def restore(
    ck: Checkpoint,
    *,
    engine: Any,
    outer: Any = None,
    comm: SiteComm | None = None,
    optimizer: bool = True,
) -> dict[str, Any]:
    """Load checkpoint ``ck`` into this rank's engine (and outer loop). Collective.

    Every rank reads its range first; if any rank fails, every rank raises the first error,
    so no rank is left waiting in a collective. Returns ``step``, ``round`` and ``notes``
    (what was not restored, for the user). The range streams load through
    :meth:`loco.state.RankState.load`.
    """
    m = ck.manifest
    comm = comm if comm is not None else SiteComm.single()
    rank, world = comm.rank, comm.world
    state = RankState(engine, outer)
    src = rank if ck.world == world else rank % ck.world
    notes: list[str] = []
    values: dict[str, torch.Tensor] = {}
    scalars: dict[str, int] = {}
    got: dict[str, Any] = {}  # frozen parameters, buffers, the torch RNG state
    err: str | None = None
    try:
        _read_state(ck, state, src, optimizer, values, scalars, notes)
        for name in ck.entries[0]:
            if name.startswith(("frozen.", "buffer.")):
                got[name] = ck.entry(0, name)
        if "rng.torch" in ck.entries[src]:
            got["rng.torch"] = ck.entry(src, "rng.torch")
        _check_rngs(ck, got, ck.scalars(src))
    except CheckpointError as e:
        err = str(e)
    err = next((e for e in comm.all_gather_object(err) if e is not None), None)
    if err is not None:
        raise CheckpointError(err)

    params, bufs = dict(engine.model.named_parameters()), dict(engine.model.named_buffers())
    for name, t in got.items():
        if name.startswith("frozen.") and name[7:] in params:
            params[name[7:]].data.copy_(t)
        elif name.startswith("buffer.") and name[7:] in bufs:
            bufs[name[7:]].copy_(t)
    if state.ef is not None and EF_RESIDUAL not in values:
        notes.append("error feedback: fresh (zero residuals)")
    state.load(values, scalars)
    _restore_rngs(got, ck.scalars(src))
    if ck.world != world:
        notes.append(f"resharded from {ck.world} to {world} rank(s)")
    ck.drop_cache()
    return {"step": int(m["step"]), "round": int(m.get("round", 0)), "notes": notes}


def _read_state(ck: Checkpoint, state: RankState, src: int, optimizer: bool,
                values: dict[str, torch.Tensor], scalars: dict[str, int],
                notes: list[str]) -> None:  # fmt: skip
    """Read ``state``'s range streams from ``ck`` into ``values`` and its scalars (from saved
    rank ``src``) into ``scalars``; what stays fresh goes to ``notes``. CheckpointError when
    the checkpoint does not fit this model or holds a malformed optimizer step."""
    engine, lo, hi = state.engine, state.lo, state.hi
    m = ck.manifest
    if m["layout"]["hash"] != engine.layout_hash:
        raise CheckpointError(
            f"{ck.path} was saved for flat layout {m['layout']['hash']} (P={ck.numel}); this "
            f"model's is {engine.layout_hash} (P={engine.numel}); build the same model"
        )
    values[MASTER] = ck.read_range(MASTER, lo, hi)
    keys = [k for k in state.inner_names() if k != MASTER]
    if not optimizer:
        notes.append("optimizer state: fresh (checkpoint.optimizer=false)")
    elif not all(ck.has(k) for k in keys):
        notes.append(f"optimizer state: fresh (the checkpoint holds none for {keys})")
    else:
        for k in keys:
            values[k] = ck.read_range(k, lo, hi)
        if not isinstance(ck.scalars(0).get(OPTIM_STEP), int):
            raise CheckpointError(f"{ck.path}: optimizer state without an integer optim_step; "
                                  "resume from another checkpoint")  # fmt: skip
        scalars[OPTIM_STEP] = ck.scalars(0)[OPTIM_STEP]
    if state.outer is None:
        return
    if ck.has(PHI):
        values[PHI] = ck.read_range(PHI, lo, hi)
        values[MOMENTUM] = ck.read_range(MOMENTUM, lo, hi)
        scalars[OUTER_ROUNDS] = int(ck.scalars(src).get(OUTER_ROUNDS, 0))
    else:
        notes.append("outer state: fresh (phi = the loaded weights)")
    if state.ef is not None and ck.has(EF_RESIDUAL):
        values[EF_RESIDUAL] = ck.read_range(EF_RESIDUAL, lo, hi)
        scalars[EF_CALLS] = int(ck.scalars(src).get(EF_CALLS, 0))
    if state.landing is not None and ck.has(LANDING_MISS):
        values[LANDING_MISS] = ck.read_range(LANDING_MISS, lo, hi)


def _restore_rngs(got: dict[str, Any], sc: dict[str, Any], py=random, npr=np.random,
                  gen=None) -> None:  # fmt: skip
    """Set torch's, Python's and NumPy's generators (or the given ones) from a checkpoint."""
    if "rng.torch" in got:
        (gen.set_state if gen is not None else torch.set_rng_state)(got["rng.torch"])
    if "rng_python" in sc:
        v, mt, gauss = sc["rng_python"]
        py.setstate((v, tuple(mt), gauss))
    if "rng_numpy" in sc:
        name, keys, pos, has_gauss, cached = sc["rng_numpy"]
        npr.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _check_rngs(ck: Checkpoint, got: dict[str, Any], sc: dict[str, Any]) -> None:
    """CheckpointError unless the saved generator states load (tried on throwaway ones)."""
    try:
        _restore_rngs(got, sc, random.Random(), np.random.RandomState(), torch.Generator())
    except Exception as e:  # noqa: BLE001 (whatever a malformed state raises)
        raise CheckpointError(f"{ck.path}: the saved random generator states do not load "
                              f"({e}); resume from another checkpoint") from None  # fmt: skip
