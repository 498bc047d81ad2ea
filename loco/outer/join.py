"""Joining a live run: members serve their round state; a new site fetches it with FetchState.

**Serving** (every rank of every member, ``join.serve``): when round ``t`` is merged (and at the
start, version = rounds done), the rank publishes on its owned range ``[lo, hi)`` the state
streams ``outer.phi`` and ``outer.momentum`` (with ``join.inner`` also ``master`` and the
optimizer moments ``optim.<name>``), each under ``<name>@<t % 2>`` with version ``t`` and under
``<name>`` (the latest). The names are :mod:`loco.state`'s, the same as in a checkpoint.
Published buffers are fresh copies, never written again, so a stream in flight stays
consistent; the two slots let a joiner read one version whole while the member publishes the next.

**Joining** (every rank of the new site, together; :func:`join`):

1. rank 0 says Hello to every peer, orders the live ones by current round (highest first) and
   reads the first one's latest state version ``v`` (one element of ``outer.phi``);
2. the source and ``v`` are broadcast; each rank fetches every stream on its own ``[lo, hi)``
   from the source ranks whose ranges intersect it (as ``Pull`` does, so rank counts may differ),
   slot ``v % 2``, checking that every piece is version ``v``;
3. the outcome is all-reduced: all ranks ok, done; the source moved on (published ``v + 2``
   during the fetch), again from the same source; the source failed (died mid-stream, timed out),
   one line logged and the next member is tried. Everything ends by ``timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from loco.engine.base import FlatEngine
from loco.gossip import GossipError, PeerInfo, Segment
from loco.outer.plausible import implausible_phi
from loco.site_comm import SiteComm
from loco.state import MASTER, MOMENTUM, OPTIM_STEP, OUTER_ROUNDS, PHI, SERVED, RankState

log = logging.getLogger(__name__)

SLOTS = 2
OUTER_STREAMS = SERVED  # ("outer.phi", "outer.momentum")
_OK, _MOVED, _FAILED = 0, 1, 2


def inner_streams(engine: FlatEngine) -> tuple[str, ...]:
    """``master`` and the engine's optimizer moments, as state stream names."""
    return RankState(engine).inner_names()


@torch.no_grad()
def publish_state(
    server, version: int, tensors: dict[str, torch.Tensor], lo: int, hi: int
) -> dict[str, int]:
    """Publish copies of ``tensors`` (values on ``[lo, hi)``) on ``server`` as ``version``,
    under ``<name>@<version % 2>`` and ``<name>``; returns each one's CRC-32."""
    crcs: dict[str, int] = {}
    if lo == hi:  # a trailing rank whose shard is all padding owns nothing
        return crcs
    for name, t in tensors.items():
        buf = t.detach().to("cpu", torch.float32).reshape(-1).clone().numpy()
        seg = Segment.make(lo, hi, buf, grid_bytes=server.chunk_bytes)
        server.publish_state(f"{name}@{version % SLOTS}", version, segments=[seg])
        server.publish_state(name, version, segments=[seg])
        crcs[name] = seg.crc32
    return crcs


class StateServer:
    """Publishes one rank's round state for joining sites (see the module docstring).

    Call :meth:`publish` once at the start and :meth:`after_step` after every outer-loop hook
    (it publishes when a new round has been merged).

    Args:
        outer: this rank's ``OuterLoop`` (its node, flat view and outer state).
        inner: also serve the master weights and optimizer moments.
        metrics: rank 0's ``MetricsWriter`` (one ``serve`` record per published version).
    """

    def __init__(self, *, outer, inner: bool = False, metrics=None) -> None:
        assert outer.node is not None, "a site that never talks serves nothing"
        self.outer, self.inner, self.metrics = outer, inner, metrics
        self._last = outer.last

    def tensors(self) -> dict[str, torch.Tensor]:
        """Live views of the served streams: phi and momentum, then (``inner``) the inner ones."""
        state = RankState(self.outer.flat.engine, self.outer)
        return state.streams(SERVED + (state.inner_names() if self.inner else ()))

    def after_step(self, done: int) -> None:
        last = self.outer.last
        if last is not None and last is not self._last:
            self._last = last
            self.publish(last.t)

    @torch.no_grad()
    def publish(self, version: int) -> None:
        """Publish the current state as ``version`` (the last merged round); rank 0 logs a
        ``serve`` record with the CRC-32 of the site's whole phi. Collective."""
        lo, hi = self.outer.flat.lo, self.outer.flat.hi
        server = self.outer.node.server
        crcs = publish_state(server, version, self.tensors(), lo, hi)
        crc = crcs.get(PHI, 0)
        if self.metrics is not None or self.outer.comm.multi:
            crc = combine_crcs((crc, (hi - lo) * 4), self.outer.comm)
        if self.metrics is not None:
            step = self.outer.schedule.end(version)
            self.metrics.log("serve", step=step, round=version, phi_crc=crc)


@dataclass
class Joined:
    """What :func:`join` fetched on this rank: the source, the version and the values on
    ``[lo, hi)`` of every stream."""

    site: str
    version: int
    tensors: dict[str, torch.Tensor]
    inner: bool
    seconds: float
    bytes_recv: int
    tries: int
    failed: list[str] = field(default_factory=list)


def _finite_fp32(buf, numel: int, lo: int) -> None:
    """Gossip validator of a state stream: ``numel`` finite fp32 values."""
    t = torch.frombuffer(buf, dtype=torch.float32) if len(buf) else torch.empty(0)
    if t.numel() != numel or not bool(torch.isfinite(t).all()):
        raise ValueError(f"state of {t.numel()} values for {numel}, or not finite")


def fetch_range(
    client, info: PeerInfo, name: str, version: int, lo: int, hi: int, timeout_s: float
) -> tuple[torch.Tensor | None, int, str, int]:
    """Stream ``name`` at ``version`` on ``[lo, hi)`` from the ranks of ``info`` owning it.

    Every piece must be raw, finite fp32 of that one version. Returns ``(values, code,
    cause, bytes)``: code ``_OK``, ``_MOVED`` (an owner holds another version in that slot)
    or ``_FAILED`` (the owner failed or sent bad values: ``cause`` is the gossip counter).
    """
    out = torch.empty(hi - lo, dtype=torch.float32)
    nbytes = 0
    end = time.monotonic() + timeout_s
    for r in info.ranks:
        a, b = max(lo, r.lo), min(hi, r.hi)
        if a >= b:
            continue
        left = end - time.monotonic()
        if left <= 0:
            return None, _FAILED, "timeout", nbytes
        res = client.fetch_state(info, f"{name}@{version % SLOTS}", a, b, timeout_s=left,
                                 out=out[a - lo : b - lo].numpy(), codec="raw",
                                 validate=_finite_fp32)  # fmt: skip
        nbytes += res.bytes_recv
        if not res.ok:
            return None, (_MOVED if res.cause == "moved" else _FAILED), res.cause, nbytes
        if res.round != version:
            return None, _MOVED, f"rank {r.rank} holds version {res.round}", nbytes
    return out, _OK, "", nbytes


def implausible_state(got: dict[str, torch.Tensor], reference: torch.Tensor | None) -> str:
    """Why fetched state must not be adopted, or ``""``: weights (phi, master) far from this
    site's own initial weights ``reference`` (same test as a partner's phi in a round), or
    second moments below zero. Values are already known to be finite."""
    for name, t in got.items():
        if name in (PHI, MASTER) and reference is not None and t.numel():
            if bad := implausible_phi(t, reference):
                return f"{name}: {bad}"
        if name.endswith("exp_avg_sq") and t.numel() and float(t.min()) < 0:
            return f"{name} holds negative values"
    return ""


def _hello_all(node, exclude: set[str], timeout_s: float) -> list[PeerInfo]:
    """Fresh Hello answers of the live peers not in ``exclude``, highest round first."""
    peers = {s: a for s, a in node.peers.items() if s not in exclude}

    def hello(item):
        site, addr = item
        try:
            return node.client.hello(addr, expect_site=site, timeout_s=timeout_s)
        except GossipError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, len(peers))) as pool:
        infos = [i for i in pool.map(hello, peers.items()) if i is not None]
    return sorted(infos, key=lambda i: (-i.current_round, i.site))


def _probe(node, info: PeerInfo, name: str, timeout_s: float) -> int | None:
    """Latest published version of state ``name`` on ``info``'s rank 0; None if not served."""
    r0 = info.ranks[0]
    res = node.client.fetch_state(info, name, r0.lo, min(r0.lo + 1, r0.hi), timeout_s=timeout_s)
    return res.round if res.ok else None


def _choose(node, exclude: set[str], min_round: int, inner: bool, timeout_s: float):
    """Rank 0: ``(site, info, version, inner)`` of the best source, or None."""
    for info in _hello_all(node, exclude, min(timeout_s, 5.0)):
        if info.current_round < min_round:
            break
        v = _probe(node, info, PHI, timeout_s)
        if v is None:
            exclude.add(info.site)  # does not serve state (join.serve=false)
            continue
        if inner and _probe(node, info, MASTER, timeout_s) is None:
            log.warning("join: %s does not serve its inner state (join.inner=false there); "
                        "fetching phi only", info.site)  # fmt: skip
            inner = False
        return info.site, info, v, inner
    return None


def _pick(node, exclude: set[str], min_round: int, inner: bool, fetch_timeout_s: float,
          end: float) -> tuple | None:  # fmt: skip
    """Rank 0: the source to fetch from (:func:`_choose`), waiting for one until ``end``;
    None at once when auto joining (``min_round > 0``) finds nobody past round 0."""
    while time.monotonic() < end:
        choice = _choose(node, exclude, min_round, inner, fetch_timeout_s)
        if choice is not None or min_round > 0:
            return choice
        exclude.clear()  # a member that failed may be back; wait a little
        time.sleep(1.0)
    return None


def _fetch_all(node, site: str, info, names: tuple[str, ...], version: int,
               span: tuple[int, int], timeout_s: float,
               reference: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], int, str, int]:  # fmt: skip
    """Every stream of ``names`` on ``span`` from ``site`` at ``version``: ``(values, code,
    cause, bytes)``. Implausible state (against ``reference``) is refused and struck."""
    lo, hi = span
    if lo >= hi:
        return {name: torch.empty(0) for name in names}, _OK, "", 0
    got: dict[str, torch.Tensor] = {}
    nbytes = 0
    for name in names:
        t, code, cause, n = fetch_range(node.client, info, name, version, lo, hi, timeout_s)
        nbytes += n
        if code != _OK:
            return got, code, cause, nbytes
        got[name] = t
    if bad := implausible_state(got, reference):
        node.strike(site, version, f"implausible state: {bad}")
        log.warning("join: %s served implausible state: %s", site, bad)
        return got, _FAILED, "implausible", nbytes
    return got, _OK, "", nbytes


def join(
    *,
    node,
    lo: int,
    hi: int,
    streams: tuple[str, ...] = OUTER_STREAMS,
    inner_names: tuple[str, ...] = (),
    min_round: int = 0,
    timeout_s: float = 300.0,
    fetch_timeout_s: float = 60.0,
    comm: SiteComm | None = None,
    say: Callable[[str], None] | None = None,
    reference: torch.Tensor | None = None,
) -> Joined | None:
    """Fetch a live member's state on ``[lo, hi)``; collective over the site's ranks.

    Args:
        node: this rank's ``GossipNode`` (started).
        lo, hi: this rank's owned range (may be empty).
        streams: the outer state streams; ``inner_names`` the inner ones (empty: not asked).
        min_round: only members whose current round is at least this are sources (auto
            joining uses 1: a run that has not finished a round is started fresh instead).
        timeout_s: give up (return None) after this long; ``fetch_timeout_s`` bounds one fetch.
        comm: the site's ranks (None: one rank).
        reference: this rank's own weights on ``[lo, hi)`` (its initial phi): a source whose
            phi or master weights are implausibly far from them is refused (struck, next one).
    Returns None when no member qualifies by the deadline (every rank returns None).
    """
    say = say or (lambda msg: None)
    comm = comm if comm is not None else SiteComm.single()
    t0 = time.monotonic()
    end = t0 + timeout_s
    exclude: set[str] = set()
    failed: list[str] = []
    tries = nbytes = 0
    inner = bool(inner_names)
    while True:
        choice = (
            _pick(node, exclude, min_round, inner, fetch_timeout_s, end) if comm.rank == 0 else None
        )
        choice = comm.broadcast_object(choice)
        if choice is None:
            return None
        site, info, version, inner = choice
        tries += 1
        names = streams + (inner_names if inner else ())
        left = max(0.1, min(fetch_timeout_s, end - time.monotonic()))
        got, code, cause, n = _fetch_all(
            node, site, info, names, version, (lo, hi), left, reference
        )
        nbytes += n
        (worst,) = comm.max_int([code])
        if worst == _OK:
            return Joined(site, version, got, inner, time.monotonic() - t0, nbytes, tries, failed)
        if time.monotonic() >= end:
            return None
        if worst == _FAILED:
            if comm.rank == 0:
                exclude.add(site)
            failed.append(site)
            say(
                f"join: fetch from {site} failed ({cause or 'on another rank'}); trying another member"
            )
        else:
            time.sleep(0.05)  # the source published a newer version meanwhile: read it again


@torch.no_grad()
def adopt(joined: Joined, *, outer, engine: FlatEngine, H: int | None = None) -> int:
    """Load ``joined`` into this rank's outer state and engine; returns the step to start at,
    the boundary of round ``version``: ``version * H``, or with ``H = None`` the outer loop's
    schedule's (``outer.schedule.end``, which knows ``outer.H_first``).

    phi and the outer momentum become the source's; the weights become its master weights
    (inner) or phi; the optimizer moments the source's (inner, step count: that boundary) or
    fresh (step count 0); the error-feedback residual zero. Loads through
    :meth:`loco.state.RankState.load`. Collective (the engine's parameter sync).
    """
    numel = outer.state.phi.numel()
    for name, t in joined.tensors.items():  # join() checked them; never load anything else
        if t.numel() != numel or not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"join: fetched {name} has {t.numel()} values or is not finite")
    got = joined.tensors
    values = {PHI: got[PHI], MOMENTUM: got[MOMENTUM]}
    if joined.inner:
        values.update({n: got[n] for n in inner_streams(engine)})
    else:
        values[MASTER] = got[PHI]
    start = joined.version * H if H is not None else outer.schedule.end(joined.version)
    step = start if joined.inner else 0
    RankState(engine, outer).load(values, {OPTIM_STEP: step, OUTER_ROUNDS: joined.version})
    return start


def site_crc(t: torch.Tensor, comm: SiteComm) -> int:
    """CRC-32 of the bytes of the site's whole vector whose rank-ordered pieces are ``t``
    (equals ``zlib.crc32`` of the concatenation). Collective."""
    import zlib

    mine = (zlib.crc32(t.contiguous().numpy().tobytes()), t.numel() * t.element_size())
    return combine_crcs(mine, comm)


def combine_crcs(mine: tuple[int, int], comm: SiteComm) -> int:
    """Combine every rank's ``(crc32, nbytes)`` in rank order. Collective."""
    from loco.gossip.framing import crc32_combine

    crc = 0
    for c, n in comm.all_gather_object(mine):
        crc = crc32_combine(crc, c, n)
    return crc
