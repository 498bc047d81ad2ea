"""Gossip between sites: gRPC mailbox servers, range pulls, membership, pairing, mTLS.

Public API (see docs/gossip.md)::

    server = GossipServer(site=..., rank=..., nproc=..., flat_size=..., run_id=..., layout_hash=...,
                          listen="host:port", tls=TlsConfig.for_site(dir, site) | insecure=True)
    server.start(); server.publish(round, "delta", payload_bytes)
    client = GossipClient(site=..., run_id=..., layout_hash=..., tls=... | insecure=True)
    members = Membership(client=client, site=..., peers={"us": "host:port"}); members.start()
    for p in partners(seed, round, members.live_sites(), site):
        res = client.pull(members.peer(p), round, "delta", lo, hi)   # res.ok / res.data / res.cause
"""

from .client import GossipClient, PeerInfo, PullResult, RankInfo, ReceivedSegment
from .counters import GossipMetrics
from .errors import (
    AuthError,
    BadPayload,
    BadRequest,
    GossipError,
    PeerBanned,
    PeerBusy,
    PeerMismatch,
    PeerUnavailable,
    PullTimeout,
    RoundEvicted,
)
from .framing import PROTOCOL_VERSION
from .mailbox import Mailbox, Segment
from .membership import Membership
from .node import GossipNode
from .options import GossipOptions
from .pairing import group_of, pairing, partners
from .ranges import owners, rank_range
from .server import GossipServer
from .tls import TlsConfig

__all__ = [
    "AuthError",
    "BadPayload",
    "BadRequest",
    "GossipClient",
    "GossipError",
    "GossipMetrics",
    "GossipNode",
    "GossipOptions",
    "GossipServer",
    "Mailbox",
    "Membership",
    "PROTOCOL_VERSION",
    "PeerBanned",
    "PeerBusy",
    "PeerInfo",
    "PeerMismatch",
    "PeerUnavailable",
    "PullResult",
    "PullTimeout",
    "RankInfo",
    "ReceivedSegment",
    "RoundEvicted",
    "Segment",
    "TlsConfig",
    "group_of",
    "owners",
    "pairing",
    "partners",
    "rank_range",
]
