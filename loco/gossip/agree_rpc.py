"""The pairing agreement on the wire: proposals served and fetched, settled groups, the gate.

Per NoLoCo round ``t``, EVERY rank of each site, from the live view its rank 0 broadcast::

    mine = propose(seed, t, live view, site, odd, roster)     # loco.gossip.agreement
    book.propose(mine)                                        # served by the Proposal RPC
    fetch the proposal of every other member of mine.group    # bounded, concurrent
    group = settle(mine, received)                            # mine.group, or (site,) alone
    book.settle(t, group)                                     # this rank's own gate

(:func:`propose_round` at the boundary; :func:`exchange` and the settle where the round's pulls
run, on a background thread when the round overlaps training.) Same view, same roster: every
rank of a site proposes the same group; the other members' proposals are fetched from their
rank 0. From the settle on (:meth:`ProposalBook.admit`) the rank serves round ``t``'s payload
streams only to the members of ``group``; a pull from anyone else is refused with ABORTED (the
client's cause ``not_agreed``, the server's counter ``served_fail_not_agreed``); a pull that
arrives before the settle waits for it (bounded by the call's deadline and ``max_wait_s``).

Each rank settles on its own, so one rank's fetch may fail where another's succeeds. That is
safe because the gates are per rank too: a rank that settled alone neither pulls the partner
nor serves it, so the partner's rank pulling that range is refused (``not_agreed``) and steps
alone on it as well; with the same rank counts on both sites (the same ranges), every range is
either averaged by both sites or by neither (a failed pull aside, as before). With different
rank counts a rank's range spans several of the partner's ranks: if those settled differently
the pull fails as a whole and this rank steps alone, while the partner's rank that settled with
it may still pull its own smaller piece: one site mixes a piece the other does not, the outcome
of a one-way failed pull, which rounds already tolerate (never a value from outside the group).

A proposal from a peer is hostile: its bytes are bounded before they are parsed, and a
proposal that is not :meth:`~loco.gossip.agreement.Proposal.valid`, or names another site or
round than asked, is a ``bad_payload`` (no strike: it only costs the pair its round).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from ._pb import gossip_pb2 as pb
from .agreement import Proposal, propose, settle
from .counters import GossipMetrics
from .errors import BadPayload, GossipError, PullTimeout, from_rpc_error, is_retryable
from .health import SERVICE

KEEP_ROUNDS = 8  # the fewest rounds of proposals and settled groups a rank keeps
MAX_PROPOSAL_BYTES = 1024  # a valid answer is < 450 bytes (3 names of <= 128 characters)
PROPOSAL_METHOD = f"/{SERVICE}/Proposal"
_EVICTED = object()


class ProposalBook:
    """One rank's proposals and settled groups of the last ``keep`` rounds, the Proposal
    handler, and the gate of the Pull handler.

    Args:
        metrics: where refusals are counted (``served_fail_not_agreed``, ...).
        max_wait_s: the longest wait of a Proposal call or of a pull for the settle.
        keep: rounds kept (at least the mailbox's ``keep_rounds``, so the gate knows the group
            of every round the mailbox still serves).
    """

    def __init__(self, *, metrics: GossipMetrics, max_wait_s: float,
                 keep: int = KEEP_ROUNDS) -> None:  # fmt: skip
        self.metrics, self.max_wait_s, self.keep = metrics, max_wait_s, max(1, keep)
        self.required = False
        self.exempt: frozenset[str] = frozenset()
        self._proposals: dict[int, Proposal] = {}
        self._settled: dict[int, tuple[str, ...]] = {}
        self._closed = False
        self._cond = threading.Condition()

    def require(self, exempt: tuple[str, ...] = ()) -> None:
        """Serve round payloads only to settled groups from now on (streams in ``exempt``,
        e.g. the final average's, are served to anyone the admission lets in)."""
        self.required, self.exempt = True, frozenset(exempt)

    def propose(self, p: Proposal) -> None:
        """This site's proposal of ``p.round`` (answered by the Proposal RPC)."""
        self._put(self._proposals, p.round, p)

    def settle(self, round: int, group: tuple[str, ...]) -> None:
        """This site's settled group of ``round`` (opens the gate for its members)."""
        self._put(self._settled, round, tuple(group))

    def settled(self, round: int) -> tuple[str, ...] | None:
        with self._cond:
            return self._settled.get(round)

    def close(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _put(self, table: dict[int, Any], round: int, value: Any) -> None:
        with self._cond:
            table[round] = value
            floor = max(table) - self.keep + 1
            for r in [r for r in table if r < floor]:
                del table[r]
            self._cond.notify_all()

    def _wait(self, table: dict[int, Any], round: int, timeout: float,
              alive: Callable[[], bool]) -> Any:  # fmt: skip
        """``table[round]``, waiting up to ``timeout``; None on timeout or close; ``_EVICTED``
        for a round older than the kept window."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if round in table:
                    return table[round]
                if table and round <= max(table) - self.keep:
                    return _EVICTED
                left = end - time.monotonic()
                if left <= 0 or self._closed or not alive():
                    return None
                self._cond.wait(min(left, 0.25))

    def _timeout(self, context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return self.max_wait_s if left is None else min(left, self.max_wait_s)

    def serve(self, req: pb.ProposalRequest, context: grpc.ServicerContext) -> pb.ProposalResponse:
        """The Proposal RPC (admission and run checks done by the caller): long-polls for this
        site's proposal of ``req.round``."""
        got = self._wait(self._proposals, req.round, self._timeout(context), context.is_active)
        if got is _EVICTED:
            context.abort(grpc.StatusCode.NOT_FOUND, f"proposal of round {req.round} evicted")
        if got is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no proposal of round {req.round} in time")  # fmt: skip
        self.metrics.add("served_proposals")
        return pb.ProposalResponse(site=got.site, round=got.round, group=list(got.group))

    def admit(self, context: grpc.ServicerContext, round: int, stream: str, caller: str) -> None:
        """Let a Pull of ``stream`` of ``round`` by ``caller`` through, or abort it: ABORTED
        when ``caller`` is not in this site's settled group (``not_agreed``)."""
        if not self.required or stream in self.exempt:
            return
        group = self._wait(self._settled, round, self._timeout(context), context.is_active)
        if group is _EVICTED:
            self.metrics.add("served_fail_evicted")
            context.abort(grpc.StatusCode.NOT_FOUND, f"round {round} evicted (pairing)")
        if group is None:
            self.metrics.add("served_fail_timeout")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"round {round}: this site has not settled its group in time")  # fmt: skip
        if caller not in group:
            self.metrics.add("served_fail_not_agreed")
            context.abort(grpc.StatusCode.ABORTED,
                          f"not_agreed: {caller!r} is not in this site's group "
                          f"{list(group)} of round {round}")  # fmt: skip


def fetch_proposal(client: Any, address: str, site: str, round: int, timeout_s: float) -> Proposal:
    """``site``'s proposal of ``round`` from its rank at ``address`` (a ``GossipClient``'s
    channel); raises ``GossipError`` (UNAVAILABLE retried with backoff, at most the client's
    ``max_retries`` times and within ``timeout_s``; a bad answer: ``BadPayload``). The
    protobuf bytes of both messages are counted in ``agree_bytes``."""
    call = client._channel(address, site).unary_unary(
        PROPOSAL_METHOD, request_serializer=pb.ProposalRequest.SerializeToString,
        response_deserializer=bytes,
    )  # fmt: skip
    req = pb.ProposalRequest(run_id=client.run_id, layout_hash=client.layout_hash, round=round,
                             site=client.site)  # fmt: skip
    end, attempt = time.monotonic() + timeout_s, 0
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise PullTimeout(f"{site}: no proposal of round {round} in {timeout_s:.1f} s",
                              peer=site)  # fmt: skip
        try:
            client.metrics.add("agree_bytes", req.ByteSize())
            raw = call(req, timeout=left)
            break
        except grpc.RpcError as e:
            err = from_rpc_error(e, site)
            if not is_retryable(err) or attempt >= client.max_retries:
                raise err from None
        attempt += 1
        time.sleep(min(client.backoff_max_s, client.backoff_s * 2**attempt, max(0.0, left)))
    client.metrics.add("agree_bytes", len(raw))
    if len(raw) > MAX_PROPOSAL_BYTES:
        raise BadPayload(f"{site}: proposal of {len(raw)} bytes > {MAX_PROPOSAL_BYTES}", peer=site)
    try:
        msg = pb.ProposalResponse.FromString(raw)
    except Exception as e:  # noqa: BLE001 (undecodable bytes from a peer)
        raise BadPayload(f"{site}: undecodable proposal: {e!r}", peer=site) from None
    p = Proposal(msg.site, msg.round, tuple(msg.group))
    if not p.valid() or p.site != site or p.round != round:
        raise BadPayload(f"{site}: bad proposal {p} for round {round}", peer=site)
    return p


@dataclass
class Settled:
    """One site's outcome of the agreement for a round: what it proposed, the group it keeps,
    and why each other proposed member is not in it (``not_agreed``, or the cause of the failed
    fetch: ``unavailable``, ``timeout``, ``bad_payload``...)."""

    round: int
    proposal: Proposal
    group: tuple[str, ...]
    causes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def proposed(self) -> list[str]:
        """The other members of this site's own proposal."""
        return [s for s in self.proposal.group if s != self.proposal.site]

    @property
    def partners(self) -> list[str]:
        """The other members of the settled group (empty: alone, n = 1)."""
        return [s for s in self.group if s != self.proposal.site]


def propose_round(*, book: ProposalBook, site: str, round: int, view: list[str],
                  roster: list[str], seed: int, odd: str, mode: str = "random",
                  key: int | None = None) -> Proposal:  # fmt: skip
    """This site's proposal of ``round`` (its pairing: ``mode`` at meeting ``key``, default
    ``round``) from ``view``, served from now on by ``book``'s Proposal RPC (no message:
    cheap enough for the boundary)."""
    mine = propose(seed, round, view, site, odd, roster, mode, key)
    book.propose(mine)
    return mine


def exchange(
    *, client: Any, mine: Proposal, address_of: Callable[[str], str | None], timeout_s: float,
    pool: ThreadPoolExecutor,
) -> Settled:  # fmt: skip
    """Fetch the proposals of the other members of ``mine.group`` (concurrently, each within
    ``timeout_s``) and settle. ``address_of(site)``: the address to fetch ``site``'s proposal
    from (None: unreachable). Counts ``agree_rounds``, ``agree_alone`` (a proposed group not
    kept) and ``agree_seconds``; no collective, so any thread of any rank may call it."""
    t0 = time.monotonic()
    others = [s for s in mine.group if s != mine.site]
    jobs = {s: pool.submit(_fetch, client, address_of, s, mine.round, timeout_s) for s in others}
    received, causes = {}, {}
    for s, job in jobs.items():
        got = job.result()
        if isinstance(got, Proposal):
            received[s] = got
        else:
            causes[s] = got
    group = settle(mine, received)
    for s in others:
        if s not in group:
            causes.setdefault(s, "not_agreed")
    secs = time.monotonic() - t0
    client.metrics.add("agree_rounds")
    client.metrics.add("agree_seconds", secs)
    if others and len(group) == 1:
        client.metrics.add("agree_alone")
    return Settled(mine.round, mine, group, causes, secs)


def agree(
    *, client: Any, book: ProposalBook, site: str, round: int, view: list[str],
    roster: list[str], seed: int, odd: str, address_of: Callable[[str], str | None],
    timeout_s: float, pool: ThreadPoolExecutor,
) -> Settled:  # fmt: skip
    """:func:`propose_round` then :func:`exchange` (module docstring)."""
    mine = propose_round(book=book, site=site, round=round, view=view, roster=roster,
                         seed=seed, odd=odd)  # fmt: skip
    return exchange(client=client, mine=mine, address_of=address_of, timeout_s=timeout_s,
                    pool=pool)  # fmt: skip


def _fetch(client: Any, address_of: Callable[[str], str | None], s: str, round: int,
           timeout_s: float) -> Proposal | str:  # fmt: skip
    """The proposal of ``s``, or the cause of the failure."""
    address = address_of(s)
    if address is None:
        return "unavailable"
    try:
        return fetch_proposal(client, address, s, round, timeout_s)
    except GossipError as e:
        return e.cause
