"""The Status RPC: the federation as one rank sees it (live sites, rounds, pairing, bytes,
strikes and bans), read-only.

Server side, :func:`member_status` gathers what a rank knows: its mailbox, the counters it
shares with its client (per peer: bytes, strikes, bans, the latest round pulled), and on the
heartbeat rank the membership's view of each peer (its last Hello). Client side,
:func:`read_status` calls Status with a deadline and :meth:`FederationStatus.from_pb` checks the
answer, every field of which is hostile: at most ``MAX_SITES`` sites and partners, strings
cut to ``MAX_NAME`` / ``MAX_ERROR`` characters and stripped of anything unprintable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc

from ._pb import gossip_pb2 as pb
from .errors import BadPayload, from_rpc_error
from .framing import PROTOCOL_VERSION
from .tls import TlsConfig, channel_credentials

if TYPE_CHECKING:  # both import this module's importer, the server
    from .membership import Membership, PeerState
    from .server import GossipServer

MAX_SITES = 4096  # sites (and partners) an answer may list
MAX_NAME = 64  # characters kept of a site name or run id
MAX_ERROR = 200  # characters kept of an error message
MAX_ANSWER_BYTES = 4 << 20  # the client's receive limit for one answer
METHOD = "/loco.v1.Gossip/Status"


# ---------------------------------------------------------------- server side


def member_status(
    server: GossipServer,
    *,
    peers: list[str],
    membership: Membership | None = None,
    pairing: tuple[int, list[str]] | None = None,
) -> pb.StatusResponse:
    """What ``server``'s rank knows of its site and of each of ``peers``.

    ``membership``: the heartbeats (rank 0), else ``live`` says nothing; ``pairing``: the
    site's last ``(round, partners)``. Byte counters of the site's own row are the rank's
    totals; a peer's row has what the rank served to it and pulled from it.
    """
    totals, by_peer = server.metrics.snapshot(), server.metrics.by_peer()
    rnd, partners = pairing if pairing is not None else (-1, [])
    me = pb.SiteStatus(
        site=server.site, live=True, round=server.mailbox.latest_round, nproc=server.nproc,
        paired_round=rnd, paired_ok=True, bytes_sent=_count(totals.get("bytes_sent")),
        bytes_recv=_count(totals.get("bytes_recv")), banned_until=-1, seen_ms_ago=0,
    )  # fmt: skip
    states = membership.states() if membership is not None else {}
    now = time.monotonic()
    rows = [_peer_row(n, states.get(n), by_peer.get(n, {}), now) for n in sorted(peers)]
    return pb.StatusResponse(
        run_id=server.run_id, protocol_version=PROTOCOL_VERSION, site=server.site,
        rank=server.rank, nproc=server.nproc, heartbeat=membership is not None,
        pairing_round=rnd, partners=list(partners), sites=[me, *rows],
    )  # fmt: skip


def _peer_row(name: str, st: PeerState | None, c: dict[str, float], now: float) -> pb.SiteStatus:
    info = st.info if st is not None else None
    return pb.SiteStatus(
        site=name,
        live=bool(st is not None and st.live),
        round=info.current_round if info is not None else -1,
        nproc=info.nproc if info is not None else 0,
        paired_round=int(c.get("paired_round", -1)),
        paired_ok=bool(c.get("paired_ok", 0)),
        bytes_sent=_count(c.get("bytes_sent")),
        bytes_recv=_count(c.get("bytes_recv")),
        strikes=_count(c.get("strikes")),
        bans=_count(c.get("bans")),
        banned_until=int(c.get("banned_until", -1)),
        misses=st.misses if st is not None else 0,
        seen_ms_ago=int((now - st.seen) * 1000) if st is not None and st.seen else -1,
        last_error=clean(st.last_error, MAX_ERROR) if st is not None else "",
    )


def _count(v: float | None) -> int:
    return max(0, int(v or 0))


# ---------------------------------------------------------------- client side


def clean(text: str, limit: int) -> str:
    """``text`` with every unprintable character (escapes, newlines) as ``?``, cut to
    ``limit`` characters (the last one then ``…``)."""
    out = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 1] + "…"


@dataclass(frozen=True)
class SiteView:
    """One row of a checked Status answer (see ``SiteStatus`` in gossip.proto)."""

    site: str
    me: bool  # the answering site
    live: bool | None  # None: the answering rank runs no heartbeats
    round: int
    nproc: int
    paired_round: int
    paired_ok: bool
    bytes_sent: int
    bytes_recv: int
    strikes: int
    bans: int
    banned_until: int
    misses: int
    seen_ms_ago: int
    last_error: str


@dataclass(frozen=True)
class FederationStatus:
    """A checked Status answer: safe to print (bounded, printable strings)."""

    run_id: str
    site: str
    rank: int
    nproc: int
    heartbeat: bool
    pairing_round: int
    partners: tuple[str, ...]
    sites: tuple[SiteView, ...]

    @staticmethod
    def from_pb(msg: pb.StatusResponse) -> FederationStatus:
        """The answer, checked; raises ValueError when it cannot be a member's view."""
        if not 1 <= len(msg.sites) <= MAX_SITES:
            raise ValueError(f"{len(msg.sites)} sites listed (1 to {MAX_SITES} allowed)")
        if len(msg.partners) > MAX_SITES:
            raise ValueError(f"{len(msg.partners)} partners listed (at most {MAX_SITES})")
        if msg.sites[0].site != msg.site:
            raise ValueError("the first site listed is not the answering site")
        if msg.protocol_version != PROTOCOL_VERSION:
            raise ValueError(f"protocol {msg.protocol_version} != {PROTOCOL_VERSION}")
        return FederationStatus(
            run_id=clean(msg.run_id, MAX_NAME), site=clean(msg.site, MAX_NAME), rank=msg.rank,
            nproc=msg.nproc, heartbeat=msg.heartbeat, pairing_round=msg.pairing_round,
            partners=tuple(clean(p, MAX_NAME) for p in msg.partners),
            sites=tuple(_site_view(s, i == 0, msg.heartbeat) for i, s in enumerate(msg.sites)),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the ``--json`` object of ``python -m loco.status``)."""
        return asdict(self)


def _site_view(s: pb.SiteStatus, me: bool, heartbeat: bool) -> SiteView:
    return SiteView(
        site=clean(s.site, MAX_NAME), me=me, live=True if me else (s.live if heartbeat else None),
        round=s.round, nproc=s.nproc, paired_round=s.paired_round, paired_ok=s.paired_ok,
        bytes_sent=s.bytes_sent, bytes_recv=s.bytes_recv, strikes=s.strikes, bans=s.bans,
        banned_until=s.banned_until, misses=s.misses, seen_ms_ago=s.seen_ms_ago,
        last_error=clean(s.last_error, MAX_ERROR),
    )  # fmt: skip


def read_status(
    address: str,
    *,
    tls: TlsConfig | None,
    target: str = "",
    caller: str = "",
    timeout_s: float = 5.0,
) -> FederationStatus:
    """Status of the member at ``address`` (``host:port``), within ``timeout_s``.

    With ``tls`` (a bundle of the run CA: any member's), ``target`` is the member's site name,
    which its certificate must carry; ``tls=None`` is plaintext. Raises the typed
    ``GossipError`` of a failed call (``from_rpc_error``), ``BadPayload`` for an answer that
    fails :meth:`FederationStatus.from_pb`.
    """
    opts = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
    if tls is None:
        channel = grpc.insecure_channel(address, options=opts)
    else:
        opts.append(("grpc.ssl_target_name_override", target))
        channel = grpc.secure_channel(address, channel_credentials(tls), options=opts)
    with channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusResponse.FromString,
        )
        try:
            msg = call(pb.StatusRequest(site=caller), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e, target or address) from None
    try:
        return FederationStatus.from_pb(msg)
    except ValueError as e:
        raise BadPayload(f"{target or address}: bad Status answer: {e}", peer=address) from None
