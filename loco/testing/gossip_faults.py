"""Gossip fault injection for drills and tests: a faulty server and a client with cut links.

- :class:`FaultyServer`: a :class:`~loco.gossip.server.GossipServer` whose Pull and FetchState
  streams obey a :class:`ServerFault` (delay, exit mid-stream, a corrupted chunk, one broken
  stream, lying header fields). ``python -m loco.gossip.peer`` builds it for its fault flags.
- :func:`cut_links`: wraps a built :class:`~loco.gossip.client.GossipClient` so that every RPC
  to a site across a partition fails at once (the ``partition`` fault of ``$LOCO_FAULTS``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from loco.gossip.client import GossipClient, PeerInfo
from loco.gossip.errors import PeerUnavailable
from loco.gossip.framing import decode_chunk, encode_header
from loco.gossip.mailbox import Segment
from loco.gossip.server import GossipServer


@dataclass
class ServerFault:
    """What a :class:`FaultyServer` does wrong. All fields default to 'no fault'; data chunks
    are counted from 0 over the server's whole life."""

    delay_s: float = 0.0  # sleep before streaming a Pull
    exit_after_chunks: int = -1  # os._exit(1) after this many data chunks (kill mid-stream)
    corrupt_chunk: int = -1  # flip a byte of this data chunk (after its crc was computed)
    unavailable_once_after: int = -1  # first Pull only: abort UNAVAILABLE after this many chunks
    header: dict = field(default_factory=dict)  # SegmentHeader fields to overwrite


class FaultyServer(GossipServer):
    """A ``GossipServer`` (same arguments) that applies ``fault`` to every stream it serves.

    The fault object is shared, not copied: servers given the same one share its one-shot
    ``unavailable_once_after``.
    """

    def __init__(self, *, fault: ServerFault, **kw: Any) -> None:
        super().__init__(**kw)
        self.fault = fault

    def _stream(
        self, segs: list[Segment], lo: int, hi: int, round: int, stream: str, context
    ) -> Iterator[bytes]:
        fault = self.fault
        if fault.delay_s:
            time.sleep(fault.delay_s)
        nchunk = 0
        for msg in super()._stream(segs, lo, hi, round, stream, context):
            header, data, _ = decode_chunk(msg)
            if header is not None:
                if fault.header:
                    for k, v in fault.header.items():
                        setattr(header, k, v)
                    msg = encode_header(header)
                yield msg
                continue
            if nchunk == fault.corrupt_chunk:
                msg = bytearray(msg)
                msg[len(msg) // 2] ^= 0xFF
                msg = bytes(msg)
            if nchunk == fault.exit_after_chunks:
                os._exit(1)
            if nchunk == fault.unavailable_once_after:
                fault.unavailable_once_after = -1
                # the base stream counted this chunk as sent before handing it over
                self.metrics.add("bytes_sent", -len(data))
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: stream broken")
            nchunk += 1
            yield msg


def cut_links(client: GossipClient, blocked: Callable[[str], bool]) -> GossipClient:
    """Make ``client`` (in place; returned) refuse every RPC to a site ``s`` while
    ``blocked(s)``: ``hello`` raises ``PeerUnavailable`` (counted ``hello_failed``) and
    ``pull``/``fetch_state`` fail as ``unavailable`` before any RPC, as a cut link would."""
    hello, admit = client.hello, client._admit

    def cut_hello(
        address: str, *, expect_site: str = "", timeout_s: float | None = None
    ) -> PeerInfo:
        if expect_site and blocked(expect_site):
            client.metrics.add("hello_failed")
            raise PeerUnavailable(f"{expect_site}: link cut (fault drill)", peer=expect_site)
        return hello(address, expect_site=expect_site, timeout_s=timeout_s)

    def cut_admit(peer: PeerInfo, req: Any) -> None:
        if blocked(peer.site):
            raise PeerUnavailable(f"{peer.site}: link cut (fault drill)", peer=peer.site)
        admit(peer, req)

    # instance attributes shadow the methods: the client's own calls go through them too
    client.hello = cut_hello  # type: ignore[method-assign]
    client._admit = cut_admit  # type: ignore[method-assign]
    return client
