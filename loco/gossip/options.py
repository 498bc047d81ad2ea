"""The gossip options with their defaults, declared once.

``GossipNode``, ``GossipClient`` and ``GossipServer`` take these as keyword arguments (their
defaults read this class); ``loco.config.GossipConfig`` extends it with validation, so the
Hydra keys ``gossip.*`` are exactly these fields, in this order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .framing import DEFAULT_CHUNK_BYTES


@dataclass
class GossipOptions:
    """gRPC between sites. mTLS unless ``insecure`` is set explicitly."""

    insecure: bool = False
    insecure_public: bool = False  # with insecure: allow plaintext on a non-loopback site.listen
    cert_dir: str | None = None  # this site's bundle DIR/<site> of `python -m loco.certs --out DIR`
    pull_timeout_s: float = 60.0  # deadline of a whole pull, retries included
    hello_timeout_s: float = 5.0  # deadline of one Hello / heartbeat
    heartbeat_s: float = 5.0
    dead_after: int = 3  # missed heartbeats before a site is dead
    strikes: int = 3  # bad payloads before a peer is banned
    ban_rounds: int = 5
    max_retries: int = 6  # retries per stall on UNAVAILABLE
    backoff_s: float = 0.2
    backoff_max_s: float = 2.0
    parallel_streams: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    keep_rounds: int = 2
    keepalive_s: float = 30.0
    max_wait_s: float = 600.0
    # concurrent Pull/FetchState/Health.Watch streams a rank serves, in total and per peer site;
    # more are refused (busy, retried); why these numbers: above MAX_STREAMS in server.py
    max_streams: int = 256
    max_streams_per_peer: int = 128
    odd: str = "triple"  # odd site count: one group of three, or one site sits out
    # NoLoCo's matchings: random, or hypercube (2**k sites: k matchings in a row average all)
    pairing: str = "random"
    # hello: a Hello to every peer per heartbeat (O(N) per site); swim: SWIM over UDP on the
    # gRPC port number, O(1) datagrams per site per heartbeat (loco.gossip.swim_membership)
    membership: str = "hello"
