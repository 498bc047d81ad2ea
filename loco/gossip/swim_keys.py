"""How SWIM datagrams are authenticated: the run key (insecure runs) or pairwise site keys (mTLS).

:class:`RunKey` (``gossip.insecure``): ``HMAC-SHA256(run key, body)[:16] + body`` with one key
derived from the run id: it keeps out strays and other runs, but anyone who knows the run id can
forge a datagram.

:class:`PairKeys` (mTLS): each site draws a random 32-byte secret per life and MACs what it sends
to ``dst`` with ``K(src -> dst) = HMAC-SHA256(secret_src, "loco-swim/" + dst)``. ``dst`` learns
that key only from ``src`` itself, over the mTLS ``Swim.Key`` RPC, which hands ``K(src -> caller)``
to the caller its certificate names (``loco.gossip.swim_membership``). So only ``src`` and ``dst``
hold a pair's key: another member can forge neither side of it (as with signatures, at 16 bytes
instead of 64 and a hash instead of an ECDSA verify). A datagram is::

    key id (4) | counter (8, little-endian) | tag (16) | body (loco.gossip.swim.encode)

``key id`` = ``HMAC(K, "id")[:4]`` names the key (a restarted sender has a new secret, hence a
new id: the receiver drops its datagrams and fetches the new key); ``counter`` counts the
sender's datagrams of this life; ``tag`` = ``HMAC-SHA256(K, key id | counter | body)[:16]``.
A receiver keeps, per sender, the highest counter and a 64-datagram window below it: a
replayed or too old counter is refused. Every refusal is counted in ``refused`` by cause.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .swim import Message, WireError, decode, encode

TAG = 16  # bytes of the HMAC tag on every datagram
KEY_BYTES = 32
WINDOW = 64  # counters below the highest seen that may still arrive (UDP reorders)
HEADER = struct.Struct("<4sQ")  # key id, counter


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class RunKey:
    """One key for the whole run (insecure runs): ``tag(16) | body``."""

    overhead = TAG

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the SWIM key must hold at least 16 bytes")
        self.key = key
        self.refused: Counter[str] = Counter()

    def seal(self, dst: str, msg: Message) -> bytes:
        body = encode(msg)
        return _mac(self.key, body)[:TAG] + body

    def open(self, data: bytes) -> Message | None:
        """The message of an authentic datagram, else None (the cause counted in ``refused``)."""
        tag, body = data[:TAG], data[TAG:]
        if not hmac.compare_digest(tag, _mac(self.key, body)[:TAG]):
            self.refused["bad_tag"] += 1
            return None
        try:
            return decode(body)
        except WireError:
            self.refused["malformed"] += 1
            return None


@dataclass
class _Peer:
    key: bytes
    key_id: bytes
    top: int = -1  # highest counter accepted
    window: int = 0  # bit i: counter top - i was accepted


def key_id(key: bytes) -> bytes:
    return _mac(key, b"id")[:4]


class PairKeys:
    """Pairwise keys of one site (mTLS runs); see the module docstring.

    ``peers``: the only names whose keys may be installed (the configured members);
    ``on_unkeyed(name)``: called (under no lock of this class) when a datagram of a configured
    member arrives under a key this site does not hold, so the caller can fetch it.
    """

    overhead = HEADER.size + TAG

    def __init__(self, site: str, peers: list[str], *, secret: bytes | None = None,
                 on_unkeyed: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.site = site
        self.secret = secret if secret is not None else os.urandom(KEY_BYTES)
        if len(self.secret) < KEY_BYTES:
            raise ValueError(f"the SWIM secret must hold at least {KEY_BYTES} bytes")
        self.peers = frozenset(peers) - {site}
        self.on_unkeyed = on_unkeyed
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._keys: dict[str, _Peer] = {}
        self._out: dict[str, tuple[bytes, bytes]] = {}  # dst -> (key, key id), derived once
        self._counter = 0

    def key_for(self, dst: str) -> bytes:
        """``K(self -> dst)``: what the ``Swim.Key`` RPC hands to the member ``dst``."""
        return _mac(self.secret, b"loco-swim/" + dst.encode())

    def install(self, src: str, key: bytes) -> bool:
        """Take ``K(src -> self)`` fetched from ``src`` over mTLS; False (ignored) when ``src``
        is no configured member or the key has the wrong size. A new key restarts the window."""
        if src not in self.peers or len(key) != KEY_BYTES:
            self.refused["bad_key"] += 1
            return False
        kid = key_id(key)
        with self._lock:
            old = self._keys.get(src)
            if old is None or old.key != key:
                self._keys[src] = _Peer(key, kid)
        return True

    def has_key(self, src: str) -> bool:
        with self._lock:
            return src in self._keys

    def seal(self, dst: str, msg: Message) -> bytes:
        with self._lock:
            out = self._out.get(dst)
            if out is None:
                key = self.key_for(dst)
                out = self._out[dst] = (key, key_id(key))
            self._counter += 1
            head = HEADER.pack(out[1], self._counter)
        body = encode(msg)
        return head + _mac(out[0], head + body)[:TAG] + body

    def open(self, data: bytes) -> Message | None:
        """The message of an authentic, fresh datagram, else None (cause in ``refused``)."""
        if len(data) < self.overhead:
            self.refused["malformed"] += 1
            return None
        head, tag, body = (
            data[: HEADER.size],
            data[HEADER.size : self.overhead],
            data[self.overhead :],
        )
        try:
            msg = decode(body)
        except WireError:
            self.refused["malformed"] += 1
            return None
        if msg.src not in self.peers:
            self.refused["unknown_sender"] += 1
            return None
        kid, counter = HEADER.unpack(head)
        with self._lock:
            peer = self._keys.get(msg.src)
            cause = self._check(peer, kid, counter, head + body, tag)
        if cause:
            self.refused[cause] += 1
            if cause == "unkeyed" and self.on_unkeyed is not None:
                self.on_unkeyed(msg.src)
            return None
        return msg

    def _check(self, peer: _Peer | None, kid: bytes, counter: int, signed: bytes,
               tag: bytes) -> str:  # fmt: skip
        """'' for an authentic fresh datagram (its counter recorded), else the refusal cause."""
        if peer is None or peer.key_id != kid:
            return "unkeyed"
        if not hmac.compare_digest(tag, _mac(peer.key, signed)[:TAG]):
            return "bad_tag"
        if counter > peer.top:
            shift = counter - peer.top
            peer.window = (
                ((peer.window << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            )
            peer.top = counter
            return ""
        back = peer.top - counter
        if back >= WINDOW or peer.window >> back & 1:
            return "replay"
        peer.window |= 1 << back
        return ""
