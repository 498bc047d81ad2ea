"""One rank's state, named once: the seam under checkpoints and joins.

A rank's state on its owned range ``[lo, hi)`` (``FlatEngine.flat_range``, the same for every
ZeRO stage) is a set of named fp32 **range streams** plus a few integer **scalars**:

==========================  ======  ===================================================
name                        kind    what
==========================  ======  ===================================================
``master``                  inner   the engine's fp32 master weights
``optim.<moment>``          inner   the optimizer's moments (``exp_avg``, ``exp_avg_sq``
                                    for AdamW, ``momentum`` for SGD)
``outer.phi``               outer   the outer loop's phi (the last merged weights)
``outer.momentum``          outer   the outer momentum
``outer.ef_residual``       outer   the delta codec's error-feedback residual (a lossy
                                    codec only; never served to joiners)
``outer.landing_miss``      outer   this site's part of the sequential landing's miss
                                    (``outer.phi_landing`` only; never served to joiners)
``optim_step``              scalar  the optimizer's step count
``outer_rounds``            scalar  outer rounds merged
``ef_calls``                scalar  the error-feedback call counter
==========================  ======  ===================================================

:class:`RankState` hands out views of these streams (for a checkpoint writer or a
``StateServer``) and loads values back (a checkpoint restore or a join). Checkpoints
(``loco.checkpoint.state``) and joins (``loco.outer.join``) are two transports over it and use
these names unchanged: in checkpoint files and on the ``FetchState`` wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from loco.engine.base import FlatEngine

if TYPE_CHECKING:
    from loco.compress import ErrorFeedback
    from loco.outer.landing import Landing
    from loco.outer.loop import OuterLoop

MASTER = "master"
OPTIM = "optim."
OUTER = "outer."
PHI = "outer.phi"
MOMENTUM = "outer.momentum"
EF_RESIDUAL = "outer.ef_residual"
LANDING_MISS = "outer.landing_miss"
SERVED = (PHI, MOMENTUM)  # the outer streams a member serves to joiners (no residual)

OPTIM_STEP = "optim_step"
OUTER_ROUNDS = "outer_rounds"
EF_CALLS = "ef_calls"


def optim_name(moment: str) -> str:
    """The stream name of optimizer moment ``moment`` (``optim.<moment>``)."""
    return OPTIM + moment


def is_range_stream(name: str) -> bool:
    """Whether ``name`` is a range stream of a rank's state (inner or outer)."""
    return name == MASTER or name.startswith((OPTIM, OUTER))


def is_outer(name: str) -> bool:
    """Whether range stream ``name`` belongs to the outer loop (``outer.*``)."""
    return name.startswith(OUTER)


class RankState:
    """The named range streams and scalars of one rank (module docstring).

    Args:
        engine: this rank's engine (its flat-state seam).
        outer: this rank's ``OuterLoop``; None: the state has no outer streams.
    """

    def __init__(self, engine: FlatEngine, outer: OuterLoop | None = None) -> None:
        self.engine, self.outer = engine, outer
        self.lo, self.hi = engine.flat_range

    @property
    def ef(self) -> ErrorFeedback | None:
        """The outer loop's error feedback (a lossy delta codec), or None."""
        payloads = self.outer.payloads if self.outer is not None else None
        return payloads.ef if payloads is not None else None

    @property
    def landing(self) -> Landing | None:
        """The outer loop's sequential landing (``outer.phi_landing``), or None."""
        payloads = self.outer.payloads if self.outer is not None else None
        return getattr(payloads, "landing", None) if payloads is not None else None

    def _ef_window(self) -> slice:
        """Where ``[lo, hi)`` sits in the residual, which covers the shard ``[slo, shi)``."""
        slo = self.outer.payloads.slo
        return slice(self.lo - slo, self.hi - slo) if self.hi > self.lo else slice(0, 0)

    def inner_names(self) -> tuple[str, ...]:
        """``master`` and the optimizer moments (in the engine's order)."""
        return (MASTER, *(optim_name(k) for k in self.engine.optim_state_range()))

    def outer_names(self) -> tuple[str, ...]:
        """phi and momentum (and the residual, with error feedback; the landing's miss, with
        the sequential landing); empty without outer."""
        if self.outer is None:
            return ()
        ef = (EF_RESIDUAL,) if self.ef is not None else ()
        return SERVED + ef + ((LANDING_MISS,) if self.landing is not None else ())

    def names(self, *, optimizer: bool = True) -> tuple[str, ...]:
        """Every range stream, inner first; without ``optimizer`` no ``optim.*``."""
        inner = self.inner_names() if optimizer else (MASTER,)
        return inner + self.outer_names()

    def streams(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Live views on ``[lo, hi)`` of ``names`` (default :meth:`names`), in that order.

        Callers that keep them (a writer, a server) copy them. KeyError for a name this rank
        does not hold."""
        names = self.names() if names is None else tuple(names)
        optim = self.engine.optim_state_range()
        out: dict[str, torch.Tensor] = {}
        for n in names:
            if n == MASTER:
                out[n] = self.engine.master_range()
            elif n.startswith(OPTIM):
                out[n] = optim[n[len(OPTIM) :]]
            elif n in SERVED and self.outer is not None:
                st = self.outer.state
                out[n] = st.phi if n == PHI else st.momentum
            elif n == EF_RESIDUAL and (ef := self.ef) is not None:
                out[n] = ef.residual[self._ef_window()]
            elif n == LANDING_MISS and (landing := self.landing) is not None:
                if landing.miss is None:  # no round landed yet: a miss of zero
                    landing.miss = torch.zeros(self.hi - self.lo)
                out[n] = landing.miss
            else:
                raise KeyError(f"rank state has no stream {n!r}")
        return out

    def scalars(self, *, optimizer: bool = True) -> dict[str, int]:
        """``optim_step`` (with ``optimizer``), ``outer_rounds`` and ``ef_calls`` (when held)."""
        out: dict[str, int] = {}
        if optimizer:
            out[OPTIM_STEP] = int(self.engine.optim_step)
        if self.outer is not None:
            out[OUTER_ROUNDS] = int(self.outer.state.rounds)
            if (ef := self.ef) is not None:
                out[EF_CALLS] = int(ef.calls)
        return out

    @torch.no_grad()
    def load(self, values: Mapping[str, torch.Tensor], scalars: Mapping[str, int]) -> None:
        """Copy ``values`` (each of ``hi - lo`` values) and ``scalars`` in. Collective.

        ``master`` is required. A missing optimizer moment is zeroed, a missing ``optim_step``
        is 0; then ``sync_params(optim_state=True)``. With an outer loop: phi and momentum are
        copied (``outer_rounds`` when given), or without ``outer.phi`` phi is the loaded master
        and momentum zero; the error-feedback residual is zeroed, then copied (with
        ``ef_calls``) when given; the landing's miss is copied when given, else none. Names
        outside the state are ignored; checking the values is the transport's job."""
        eng = self.engine
        eng.master_range().copy_(values[MASTER])
        for k, v in eng.optim_state_range().items():
            if (name := optim_name(k)) in values:
                v.copy_(values[name])
            else:
                v.zero_()
        eng.optim_step = scalars.get(OPTIM_STEP, 0)
        eng.sync_params(optim_state=True)
        if self.outer is None:
            return
        st = self.outer.state
        if PHI in values:
            st.phi.copy_(values[PHI])
            st.momentum.copy_(values[MOMENTUM])
            if OUTER_ROUNDS in scalars:
                st.rounds = scalars[OUTER_ROUNDS]
        else:
            st.phi.copy_(eng.master_range())
            st.momentum.zero_()
        if (ef := self.ef) is not None:
            ef.residual.zero_()
            if EF_RESIDUAL in values:
                ef.residual[self._ef_window()] = values[EF_RESIDUAL].to(ef.residual.device)
                ef.calls = scalars.get(EF_CALLS, 0)
        if (landing := self.landing) is not None:
            miss = values.get(LANDING_MISS)
            landing.miss = miss.detach().float().cpu().clone() if miss is not None else None
