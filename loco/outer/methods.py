"""The outer step on one rank's flat range, exactly as the NoLoCo spec writes it.

All tensors are fp32 and 1-D over the rank's own range ``[lo, hi)``. The caller gathers the
group's DECODED deltas and phis (its own decoded values included, so every member of a group
computes the same means) and calls :meth:`OuterStep.apply`, which updates ``phi``, the outer
momentum and ``theta`` in place. ``apply`` checks every input before touching any state: a
non-finite or wrong-length input raises ``ValueError`` and leaves the state as it was, so the
caller can drop that member and retry with the members that remain.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass
class OuterState:
    """Per-rank outer state over the rank's range: slow weights and outer momentum."""

    phi: torch.Tensor
    momentum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    rounds: int = 0  # outer steps applied so far

    def __post_init__(self) -> None:
        assert self.phi.dtype == torch.float32 and self.phi.dim() == 1
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.phi)

    @classmethod
    def start(cls, theta: torch.Tensor) -> OuterState:
        """phi <- theta at the start of the first round, momentum zero."""
        return cls(phi=theta.detach().to(torch.float32, copy=True))


def _check(name: str, ts: list[torch.Tensor], n: int) -> None:
    if not ts:
        raise ValueError(f"no {name} given; the group holds at least this site")
    for i, t in enumerate(ts):
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; expected ({n},)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}[{i}] holds a non-finite value; that member must be dropped")


class OuterStep:
    """Base of the outer optimizers: ``apply`` one round on this rank's range."""

    name = "base"
    sends_delta = True  # whether a group exchanges deltas beside its points (see apply)

    def apply(
        self,
        theta: torch.Tensor,
        state: OuterState,
        deltas: list[torch.Tensor],
        phis: list[torch.Tensor],
        own: torch.Tensor | None = None,
    ) -> None:
        """Update ``state`` and set ``theta <- phi``. ``deltas``/``phis``: the group's decoded
        values (this site's among them; where :attr:`sends_delta` is false, ``deltas`` is this
        site's own exact delta alone); ``own``: this site's phi as the others decoded it (its
        entry in ``phis``; None: ``state.phi``, exact)."""
        n = state.phi.numel()
        _check("deltas", deltas, n)
        _check("phis", phis, n)
        assert theta.numel() == n
        self._update(state, deltas, phis, state.phi if own is None else own)
        state.rounds += 1
        theta.copy_(state.phi)

    def consensus_point(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        """The point of this site that its group exchanges and averages (what ``phis`` and
        ``own`` of :meth:`apply` hold), given this round's own exact ``delta``: ``state.phi``
        unless a method says otherwise."""
        return state.phi

    def window_momentum(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        """The momentum whose per-block largest value sizes a lattice frame of the consensus
        point before any partner difference was seen (the momentum rule): ``state.momentum``
        unless a method's point moves with something else."""
        return state.momentum

    def _update(self, state: OuterState, deltas: list[torch.Tensor], phis: list[torch.Tensor],
                own: torch.Tensor) -> None:  # fmt: skip
        raise NotImplementedError


CONSENSUS = ("momentum", "weights", "lookahead", "stepped")  # where NoLoCo's gamma pull acts


class NoLoCo(OuterStep):
    """``m <- alpha m + beta mean(delta) - gamma (phi - mean(phi))``; ``phi <- phi + m``.

    With one member (an unreachable or dropped partner) this is the local heavy-ball step; with
    identical members the gamma term vanishes and it is the DiLoCo-style heavy-ball step.

    Two options leave the spec's form (the defaults are the spec):

    - ``consensus="weights"``: the gamma pull acts on phi directly instead of through the
      momentum: ``m <- alpha m + beta mean(delta)``; ``phi <- phi - gamma (phi - mean(phi)) + m``.
      The momentum then carries only the group's mean delta, so a high ``alpha`` no longer
      amplifies the pull into oscillation (the spec's form diverges at alpha 0.9).
    - ``consensus="lookahead"``: as ``weights``, but the group averages the members' look-ahead
      points ``phi + c m`` (:meth:`consensus_point`; ``c`` = ``alpha**2`` with ``nesterov``,
      else ``alpha``: the part of the coming step a member's own momentum makes) instead of
      their phis. With ``gamma`` 1 the members of a group then end the round on one phi
      (``mean(phi + c m) + beta (1 + alpha) mean(delta)`` with ``nesterov``), where under
      ``weights`` their own momenta part them again by ``c`` times the momenta's difference.
    - ``consensus="stepped"``: each member takes the step on its OWN delta with its own
      momentum (``m <- alpha m + beta delta``) and the group averages the stepped points
      ``phi + step`` (:meth:`consensus_point`): ``phi <- phi + step - gamma (point -
      mean(points))``, with ``gamma`` 1 one point for the whole group. No delta travels
      (:attr:`sends_delta` false): what a member learns of the others' deltas comes with
      their points, coded next to its own point (the lattice), so only the members'
      differences cost bits. The momenta stay each member's own.
    - ``nesterov=True``: the step is ``beta mean(delta) + alpha m`` (look-ahead) instead of ``m``.

    The mean over all sites of phi follows the same heavy-ball (or Nesterov) step on the mean of
    all deltas in every form (the gamma terms cancel within each group): with ``nesterov``,
    ``alpha`` 0.9 and ``beta`` 0.7 the sites' mean moves exactly as DiLoCo's Nesterov SGD.
    """

    name = "noloco"

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.7, gamma: float = 0.7,
                 consensus: str = "momentum", nesterov: bool = False) -> None:  # fmt: skip
        if consensus not in CONSENSUS:
            raise ValueError(f"consensus={consensus!r}: choose {', '.join(CONSENSUS)}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.consensus, self.nesterov = consensus, nesterov

    @property
    def sends_delta(self) -> bool:  # type: ignore[override]
        return self.consensus != "stepped"

    def _own_step(self, state: OuterState, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``stepped``: this member's momentum after its own ``delta``, and its step."""
        m = state.momentum.mul(self.alpha).add_(delta, alpha=self.beta)
        step = m.mul(self.alpha).add_(delta, alpha=self.beta) if self.nesterov else m.clone()
        return m, step

    def _update(self, state: OuterState, deltas: list[torch.Tensor], phis: list[torch.Tensor],
                own: torch.Tensor) -> None:  # fmt: skip
        if self.consensus == "stepped":  # deltas: this member's own alone
            m, step = self._own_step(state, deltas[0])
            state.momentum.copy_(m)
            gap = own - torch.stack(phis).mean(0)
            state.phi.add_(step).sub_(gap, alpha=self.gamma)
            return
        mean_delta = torch.stack(deltas).mean(0)
        # from decoded values only: every member of the group computes the same gaps, which sum
        # to zero over the group, so a lossy phi code moves no group's mean
        gap = own - torch.stack(phis).mean(0)
        g = mean_delta.mul(self.beta)
        if self.consensus == "momentum":
            g.sub_(gap, alpha=self.gamma)
        m = state.momentum
        m.mul_(self.alpha).add_(g)
        state.phi.add_(g.add_(m, alpha=self.alpha) if self.nesterov else m)
        if self.consensus != "momentum":
            state.phi.sub_(gap, alpha=self.gamma)

    def consensus_point(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        if self.consensus == "stepped":
            return state.phi + self._own_step(state, delta)[1]
        if self.consensus != "lookahead":
            return state.phi
        c = self.alpha**2 if self.nesterov else self.alpha
        return state.phi + c * state.momentum

    def window_momentum(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        if self.consensus == "stepped":  # the point moves by the step of this round's momentum
            return self._own_step(state, delta)[0]
        return state.momentum


class Local(NoLoCo):
    """Every round is local: the heavy-ball step on this site's own delta only (n = 1)."""

    name = "local"

    def apply(self, theta, state, deltas, phis, own=None) -> None:  # type: ignore[override]
        super().apply(theta, state, deltas[:1], phis[:1], own)


class DiLoCo(OuterStep):
    """``g = -mean(delta)`` over all sites, one torch-SGD Nesterov step on phi."""

    name = "diloco"

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        self.lr, self.mu, self.nesterov = lr, momentum, nesterov

    def _update(self, state: OuterState, deltas: list[torch.Tensor], phis: list[torch.Tensor],
                own: torch.Tensor) -> None:  # fmt: skip
        g = -torch.stack(deltas).mean(0)
        buf = state.momentum
        # torch.optim.SGD: the first step initialises the buffer to g (no dampening)
        if state.rounds == 0:
            buf.copy_(g)
        else:
            buf.mul_(self.mu).add_(g)
        step = g.add(buf, alpha=self.mu) if self.nesterov else buf
        state.phi.sub_(step, alpha=self.lr)


# the outer methods by name (``outer.method``), in the order error messages list them
OUTER_METHODS: dict[str, type[OuterStep]] = {"noloco": NoLoCo, "diloco": DiLoCo, "local": Local}


def _keywords(cls: type[OuterStep]) -> tuple[str, ...]:
    """The keyword arguments a method's constructor takes."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


NOLOCO_KEYS = _keywords(NoLoCo)


def build_outer(method: str, **kw: float | bool | str) -> OuterStep:
    """An outer step by name, with only the keywords that method takes."""
    cls = OUTER_METHODS.get(method)
    if cls is None:
        *head, last = OUTER_METHODS
        raise ValueError(
            f"outer.method={method!r} is not allowed; choose {', '.join(head)} or {last}"
        )
    return cls(**{k: kw[k] for k in _keywords(cls) if k in kw})
