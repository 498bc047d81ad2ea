"""SWIM members (:class:`loco.gossip.swim.Swim`, the real state machine) on a simulated network.

Events on one heap: each member ticks at its period start and again after the ack timeout
(when it may send ping-reqs); each message arrives after its link's latency, or is lost with
probability ``loss``. Message sizes are the real wire form (``encode``) plus the UDP transport's
16-byte tag, counted per sender.
"""

from __future__ import annotations

import heapq
import random

import numpy as np

from loco.gossip.swim import Message, Swim, SwimOptions, encode
from loco.gossip.swim_udp import TAG

from .links import LinkModel


class SimMembership:
    """Every site's SWIM member; ``advance(t)`` runs the network up to time ``t``."""

    def __init__(self, names: list[str], links: LinkModel, *, period_s: float, loss: float,
                 seed: int) -> None:  # fmt: skip
        self.names, self.links, self.loss = names, links, loss
        self.index = {n: i for i, n in enumerate(names)}
        self.options = SwimOptions(period_s=period_s, ack_timeout_s=0.3 * period_s)
        self.rng = random.Random(seed)
        self.members = {
            n: Swim(n, names, random.Random(seed * 7919 + i), self.options)
            for i, n in enumerate(names)
        }
        self.down: set[str] = set()
        self.bytes_sent = np.zeros(len(names))
        self.now = 0.0
        self._heap: list[tuple[float, int, int, str, Message | None]] = []
        self._k = 0
        self._life = dict.fromkeys(names, 0)  # a restart starts a new life; old ticks drop
        for n in names:  # periods start at random offsets, as unsynchronised clocks do
            self._push(self.rng.uniform(0, period_s), n, None)

    def _push(self, at: float, to: str, msg: Message | None) -> None:
        self._k += 1
        heapq.heappush(self._heap, (at, self._k, self._life[to], to, msg))

    def _send(self, at: float, src: str, out: list[tuple[str, Message]]) -> None:
        i = self.index[src]
        for to, msg in out:
            self.bytes_sent[i] += len(encode(msg)) + TAG
            if to in self.index and self.rng.random() >= self.loss:
                self._push(at + self.links.latency(i, self.index[to]), to, msg)

    def advance(self, t: float) -> None:
        """Process every event up to time ``t``."""
        while self._heap and self._heap[0][0] <= t:
            at, _, life, to, msg = heapq.heappop(self._heap)
            if to in self.down or (msg is None and life != self._life[to]):
                continue
            m = self.members[to]
            if msg is None:
                self._send(at, to, m.tick(at))
                self._push(max(m.next_tick(), at + 1e-6), to, None)
            else:
                self._send(at, to, m.receive(at, msg))
        self.now = t

    def kill(self, name: str) -> None:
        self.down.add(name)

    def restart(self, name: str, at: float, incarnation: int) -> None:
        """The site comes back as a fresh member with a higher incarnation."""
        self.down.discard(name)
        self._life[name] += 1
        i = self.index[name]
        self.members[name] = Swim(name, self.names, random.Random(i + 10**6 + incarnation),
                                  self.options, incarnation=incarnation)  # fmt: skip
        self._push(at, name, None)

    def view(self, name: str) -> list[str]:
        return self.members[name].live()
