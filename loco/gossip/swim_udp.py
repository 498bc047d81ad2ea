"""SWIM over real UDP sockets: one thread per member, every datagram authenticated.

``auth`` seals and opens datagrams (:mod:`loco.gossip.swim_keys`: the run key of insecure runs,
or pairwise site keys under mTLS). One over ``MAX_DATAGRAM`` bytes, with a bad tag, a stale
counter, an unknown key or that does not parse is dropped and counted in ``rejected`` (never
applied; the cause in ``auth.refused``). Addresses come from the configured book ``{name: (host, port)}``; a member not in it
is learned from the source address of its first authenticated datagram.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time

from .swim import Member, Message, Swim, SwimOptions
from .swim_keys import TAG, PairKeys, RunKey

__all__ = ["MAX_DATAGRAM", "TAG", "UdpSwim"]
log = logging.getLogger(__name__)
MAX_DATAGRAM = 4096


class UdpSwim:
    """A :class:`Swim` member on a UDP socket bound to ``address``; ``start``/``stop``.
    Datagrams are sealed by ``auth``, or with the run key ``key`` (:class:`RunKey`)."""

    def __init__(self, *, site: str, address: tuple[str, int], book: dict[str, tuple[str, int]],
                 key: bytes = b"", auth: RunKey | PairKeys | None = None,
                 options: SwimOptions | None = None, seed: int = 0, incarnation: int = 0,
                 trust_seeds: bool = True) -> None:  # fmt: skip
        self.auth = auth if auth is not None else RunKey(key)
        self.book = dict(book)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = self.sock.getsockname()
        self.swim = Swim(site, list(book), random.Random(seed), options or SwimOptions(),
                         incarnation=incarnation, trust_seeds=trust_seeds)  # fmt: skip
        self.lock = threading.Lock()
        self.bytes_sent = self.bytes_recv = self.sent = self.rejected = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def meet(self, book: dict[str, tuple[str, int]]) -> None:
        """Add seed members (e.g. when the peers' ports are known only after binding)."""
        with self.lock:
            self.book.update(book)
            for name in book:
                if name != self.swim.site:
                    self.swim.members.setdefault(name, Member(heard=self.swim.trust_seeds))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="swim-udp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close()

    def live(self) -> list[str]:
        with self.lock:
            return self.swim.live()

    def _send(self, out: list[tuple[str, Message]]) -> None:
        for to, msg in out:
            addr = self.book.get(to)
            if addr is None:
                continue
            data = self.auth.seal(to, msg)
            try:
                self.sock.sendto(data, addr)
            except OSError as e:
                log.debug("swim send to %s failed: %s", to, e)
                continue
            self.bytes_sent += len(data)
            self.sent += 1

    def _accept(self, data: bytes, src: tuple[str, int]) -> Message | None:
        if len(data) > MAX_DATAGRAM:
            self.auth.refused["oversize"] += 1
            msg = None
        else:
            msg = self.auth.open(data)
        if msg is None:
            self.rejected += 1
            return None
        self.book.setdefault(msg.src, src)
        return msg

    def _run(self) -> None:
        self.sock.settimeout(0.02)
        while not self._stop.is_set():
            with self.lock:
                self._send(self.swim.tick(time.monotonic()))
            try:
                data, src = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self.bytes_recv += len(data)
            msg = self._accept(data, src)
            if msg is not None:
                with self.lock:
                    self._send(self.swim.receive(time.monotonic(), msg))
