"""SWIM-style membership: a few probes per beat, indirect probes, piggybacked updates.

Each protocol period (one ``tick``) a member probes ONE other member (round-robin over a
shuffled list, so every member is probed within a bounded number of periods). No ack within
``ack_timeout_s``: it asks ``indirect`` random others to probe it (PingReq). No ack by the end of
the period: the target becomes *suspect*; a suspect not refuted within ``suspect_periods``
periods is *dead*. Every message carries up to ``max_updates`` membership updates
``(name, status, incarnation)``, each retransmitted about ``retransmit * log2(N + 1)`` times,
so news reaches everybody in O(log N) periods while each member sends O(1) messages per
period (1 ping + ``indirect`` ping-reqs at most, plus the acks it owes).

A member that hears itself suspected refutes it with a higher incarnation (a stale suspicion or
death claim about it makes it announce its alive update again), and a member that hears directly
from one it holds dead spreads that death again, so the sender learns it and answers with its
alive update: a member whose first datagrams were lost (started late, keys not yet fetched)
is not dead for good. Precedence of an
update over the state held about a member (the SWIM rules): alive(i) beats suspect/alive(j) if
i > j; suspect(i) beats alive(j) if i >= j and suspect(j) if i > j; dead beats everything of
the same or lower incarnation. A restarted member comes back with a higher ``incarnation`` (its
start time), which beats the dead entry.

The same class runs over real sockets (:class:`loco.gossip.swim_udp.UdpSwim`) and in the
simulator (:mod:`loco.sim`): the clock is the ``now`` argument of every call, randomness is an
injected ``random.Random``, and messages are returned to the caller, which sends them.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass, field

ALIVE, SUSPECT, DEAD = 0, 1, 2
STATUS_NAMES = ("alive", "suspect", "dead")
PING, PING_REQ, ACK = 0, 1, 2
MAX_NAME = 64  # bytes of a site name on the wire
MAX_UPDATES_ON_WIRE = 64  # a message announcing more updates is refused


@dataclass(frozen=True)
class Update:
    name: str
    status: int
    incarnation: int


@dataclass(frozen=True)
class Message:
    """One SWIM datagram. ``target``: whom a PING_REQ asks to probe (or the probed site an ACK
    answers for); ``relay``: who must receive the ACK of a relayed PING ("" if nobody)."""

    kind: int
    src: str
    seq: int
    target: str = ""
    relay: str = ""
    updates: tuple[Update, ...] = ()


class WireError(ValueError):
    """A datagram that is not a valid SWIM message (its cause in the text)."""


def _put_name(out: bytearray, name: str) -> None:
    raw = name.encode()
    if len(raw) > MAX_NAME:
        raise ValueError(f"site name {name!r} is longer than {MAX_NAME} bytes")
    out.append(len(raw))
    out += raw


def encode(msg: Message) -> bytes:
    """Compact wire form: kind, seq, names as (length, utf-8), updates (name, status, inc)."""
    out = bytearray(struct.pack("<BQ", msg.kind, msg.seq))
    for name in (msg.src, msg.target, msg.relay):
        _put_name(out, name)
    out.append(len(msg.updates))
    for u in msg.updates:
        _put_name(out, u.name)
        out += struct.pack("<BQ", u.status, u.incarnation)
    return bytes(out)


def decode(raw: bytes) -> Message:
    """Parse a datagram; every length and count is bounded before use (raises WireError)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise WireError(f"truncated at byte {pos} of {len(raw)} (needed {n} more)")
        pos += n
        return raw[pos - n : pos]

    def name() -> str:
        n = take(1)[0]
        if n > MAX_NAME:
            raise WireError(f"name of {n} bytes (limit {MAX_NAME})")
        try:
            return take(n).decode()
        except UnicodeDecodeError as e:
            raise WireError(f"name is not utf-8: {e}") from None

    kind, seq = struct.unpack("<BQ", take(9))
    if kind not in (PING, PING_REQ, ACK):
        raise WireError(f"unknown message kind {kind}")
    src, target, relay = name(), name(), name()
    count = take(1)[0]
    if count > MAX_UPDATES_ON_WIRE:
        raise WireError(f"{count} updates (limit {MAX_UPDATES_ON_WIRE})")
    updates = []
    for _ in range(count):
        who = name()
        status, inc = struct.unpack("<BQ", take(9))
        if status not in (ALIVE, SUSPECT, DEAD):
            raise WireError(f"unknown status {status} for {who!r}")
        updates.append(Update(who, status, inc))
    if pos != len(raw) or not src:
        raise WireError("trailing bytes" if src else "empty sender name")
    return Message(kind, src, seq, target, relay, tuple(updates))


@dataclass
class Member:
    status: int = ALIVE
    incarnation: int = 0
    suspect_since: float = 0.0
    heard: bool = False  # a message from it, or its own alive update, arrived


@dataclass
class _Probe:
    target: str
    seq: int
    sent: float
    indirect_sent: bool = False
    acked: bool = False


@dataclass
class SwimOptions:
    """``period_s``: one probe per period; ``ack_timeout_s``: wait before indirect probes;
    ``indirect``: helpers asked per failed probe; ``suspect_periods``: periods a suspect has to
    refute before it is dead; ``retransmit``: an update rides ``retransmit * log2(N+1)``
    messages; ``max_updates``: updates per message; ``max_members``: the member table's bound
    (new names past it are not taken, and counted in ``Swim.overflow``)."""

    period_s: float = 1.0
    ack_timeout_s: float = 0.3
    indirect: int = 3
    suspect_periods: int = 4
    retransmit: float = 3.0
    max_updates: int = 8
    max_members: int = 65536  # names held at most; a message naming more new ones is ignored


@dataclass
class Swim:
    """One member's SWIM state machine. ``seeds``: names it knows at start (live until shown
    otherwise, or, without ``trust_seeds``, once heard from); ``incarnation``: its own (a
    restart must start above its previous one)."""

    site: str
    seeds: list[str]
    rng: random.Random
    options: SwimOptions = field(default_factory=SwimOptions)
    incarnation: int = 0
    trust_seeds: bool = True  # seeds are live from the start (a federation started together)
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.seeds:
            if name != self.site:
                self.members.setdefault(name, Member(heard=self.trust_seeds))
        self._queue: dict[str, int] = {}  # name -> sends left of its latest update
        self._order: list[str] = []
        self._probe: _Probe | None = None
        self._seq = 0
        self._relays: dict[int, tuple[str, int]] = {}  # my seq -> (asker, asker's seq)
        self._period_end = -math.inf
        self.overflow = 0  # new names refused because the member table is full
        self._announce(self.site)

    # -- the view ------------------------------------------------------------------------
    def live(self) -> list[str]:
        """Sorted names of the members heard of and not known dead (suspects included), self
        included. With ``trust_seeds`` off, a seed counts only once heard from: directly, or by
        an alive update newer than the seed's incarnation 0 (members that start at their start
        time as incarnation spread that epidemically)."""
        return sorted(
            [self.site] + [n for n, m in self.members.items() if m.status != DEAD and m.heard]
        )

    def roster(self) -> list[str]:
        """Sorted names of every member ever known, dead ones included, self included."""
        return sorted([self.site, *self.members])

    def status(self, name: str) -> int | None:
        m = self.members.get(name)
        return m.status if m is not None else None

    # -- driving -------------------------------------------------------------------------
    def next_tick(self) -> float:
        """When ``tick`` next has something to do (ticking more often is harmless)."""
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent:
            return min(self._period_end, p.sent + self.options.ack_timeout_s)
        return self._period_end

    def tick(self, now: float) -> list[tuple[str, Message]]:
        """Advance to ``now``: time out probes and suspects, start a new period when due."""
        out: list[tuple[str, Message]] = []
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect_sent and now >= p.sent + self.options.ack_timeout_s:
                p.indirect_sent = True
                out += self._ping_reqs(p)
        if now >= self._period_end:
            if p is not None and not p.acked:
                self._suspect(p.target, now)
            out += self._start_period(now)
        self._expire_suspects(now)
        return out

    def receive(self, now: float, msg: Message) -> list[tuple[str, Message]]:
        """Handle one message from a peer; returns the messages to send in answer."""
        if msg.src == self.site:
            return []
        for u in msg.updates:
            self._apply(u, now)
        self._heard_from(msg.src, now)
        if msg.kind == PING:
            return [(msg.src, self._msg(ACK, seq=msg.seq, target=self.site, relay=msg.relay))]
        if msg.kind == PING_REQ:
            seq = self._next_seq()
            self._relays[seq] = (msg.src, msg.seq)
            return [(msg.target, self._msg(PING, seq=seq, relay=self.site))]
        relayed = self._relays.pop(msg.seq, None)
        if relayed is not None:  # an ack for a probe I made on someone's behalf
            asker, seq = relayed
            return [(asker, self._msg(ACK, seq=seq, target=msg.target))]
        p = self._probe
        if p is not None and msg.seq == p.seq and msg.target == p.target:
            p.acked = True
        return []

    # -- internals -----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _start_period(self, now: float) -> list[tuple[str, Message]]:
        self._period_end = now + self.options.period_s
        self._relays.clear()
        target = self._next_target()
        if target is None:
            self._probe = None
            return []
        self._probe = _Probe(target, self._next_seq(), now)
        return [(target, self._msg(PING, seq=self._probe.seq))]

    def _next_target(self) -> str | None:
        while self._order:
            name = self._order.pop()
            m = self.members.get(name)
            if m is not None and m.status != DEAD:
                return name
        self._order = [n for n, m in self.members.items() if m.status != DEAD]
        self.rng.shuffle(self._order)
        return self._order.pop() if self._order else None

    def _ping_reqs(self, p: _Probe) -> list[tuple[str, Message]]:
        others = [n for n, m in self.members.items() if m.status == ALIVE and n != p.target]
        helpers = self.rng.sample(others, min(self.options.indirect, len(others)))
        return [(h, self._msg(PING_REQ, seq=p.seq, target=p.target)) for h in helpers]

    def _msg(self, kind: int, *, seq: int, target: str = "", relay: str = "") -> Message:
        return Message(kind, self.site, seq, target, relay, self._piggyback())

    def _piggyback(self) -> tuple[Update, ...]:
        if not self._queue:
            return ()
        # the least-sent updates first: fresh news travels before old news
        names = sorted(self._queue, key=lambda n: -self._queue[n])[: self.options.max_updates]
        out = []
        for n in names:
            out.append(self._update_of(n))
            self._queue[n] -= 1
            if self._queue[n] <= 0:
                del self._queue[n]
        return tuple(out)

    def _update_of(self, name: str) -> Update:
        if name == self.site:
            return Update(name, ALIVE, self.incarnation)
        m = self.members[name]
        return Update(name, m.status, m.incarnation)

    def _announce(self, name: str) -> None:
        n = len(self.members) + 1
        self._queue[name] = max(1, math.ceil(self.options.retransmit * math.log2(n + 1)))

    def _apply(self, u: Update, now: float) -> None:
        if u.name == self.site:
            if u.status != ALIVE:
                if u.incarnation >= self.incarnation:
                    self.incarnation = u.incarnation + 1  # refute
                self._announce(self.site)  # a stale claim: the sender needs my alive update
            return
        m = self.members.get(u.name)
        if m is None:
            if u.status == DEAD or not self._room():
                return
            self.members[u.name] = Member(u.status, u.incarnation, now, u.status == ALIVE)
            self._announce(u.name)
            return
        if u.status == ALIVE and u.incarnation > m.incarnation:
            m.heard = True  # a newer alive update can only start at the member itself
        if _overrides(u, m):
            if u.status == SUSPECT and m.status != SUSPECT:
                m.suspect_since = now
            m.status, m.incarnation = u.status, u.incarnation
            self._announce(u.name)

    def _room(self) -> bool:
        """Whether a new name may enter the member table (else it is counted and ignored)."""
        if len(self.members) < self.options.max_members:
            return True
        self.overflow += 1
        return False

    def _heard_from(self, name: str, now: float) -> None:
        m = self.members.get(name)
        if m is None:
            if self._room():
                self.members[name] = Member(ALIVE, 0, now, heard=True)
                self._announce(name)
        elif m.status != DEAD:
            m.heard = True
        else:  # a dead one must come back with a higher incarnation: tell it it is held dead
            self._announce(name)  # (it refutes, or re-announces a newer life it already has)

    def _suspect(self, name: str, now: float) -> None:
        m = self.members.get(name)
        if m is not None and m.status == ALIVE:
            m.status, m.suspect_since = SUSPECT, now
            self._announce(name)

    def _expire_suspects(self, now: float) -> None:
        limit = self.options.suspect_periods * self.options.period_s
        for name, m in self.members.items():
            if m.status == SUSPECT and now - m.suspect_since >= limit:
                m.status = DEAD
                self._announce(name)


def _overrides(u: Update, m: Member) -> bool:
    if m.status == DEAD:
        return u.incarnation > m.incarnation and u.status != DEAD
    if u.status == DEAD:
        return u.incarnation >= m.incarnation
    if u.status == SUSPECT:
        return u.incarnation > m.incarnation or (
            u.incarnation == m.incarnation and m.status == ALIVE
        )
    return u.incarnation > m.incarnation
