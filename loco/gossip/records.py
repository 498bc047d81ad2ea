"""What Hello and a pull return, and the bounds a peer's answers are checked against.

``PeerInfo.problems`` is the rank-table check; ``PullResult`` is the never-raising outcome of a
pull (see :mod:`loco.gossip.client`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ._pb import gossip_pb2 as pb
from .errors import GossipError
from .ranges import rank_range

Validator = Callable[[memoryview, int, int], None]
"""``check(buf, numel, lo)``: raise if ``buf`` is not a valid payload of ``numel`` values starting
at flat index ``lo`` (a segment's owner range, or the pulled range for raw payloads)."""
SegmentBytes = Callable[[int], int]
"""``limit(numel)``: the most bytes an opaque segment of ``numel`` values may hold."""

MAX_RANKS = 4096  # ranks a peer may report in Hello
MAX_FLAT_SIZE = 1 << 40  # values a peer's flat vector may have (4 TiB of fp32)
MAX_ADDRESS = 256  # characters of a rank address
SEGMENT_SLACK = 4096  # bytes an opaque segment may hold beyond its per-value bound


def default_segment_bytes(numel: int) -> int:
    """Without a caller's bound an opaque segment holds at most 8 bytes per value."""
    return 8 * numel + SEGMENT_SLACK


@dataclass(frozen=True)
class RankInfo:
    rank: int
    address: str
    lo: int
    hi: int


@dataclass(frozen=True)
class PeerInfo:
    """What a site said in Hello: identity, layout and where each of its ranks listens."""

    site: str
    run_id: str
    layout_hash: str
    protocol_version: int
    nproc: int
    flat_size: int
    ranks: tuple[RankInfo, ...]
    current_round: int

    @staticmethod
    def from_pb(msg: pb.HelloResponse) -> PeerInfo:
        """The answer as sent; :meth:`problems` says what is wrong with its rank table."""
        return PeerInfo(
            site=msg.site,
            run_id=msg.run_id,
            layout_hash=msg.layout_hash,
            protocol_version=msg.protocol_version,
            nproc=msg.nproc,
            flat_size=msg.flat_size,
            ranks=tuple(RankInfo(r.rank, r.address, r.lo, r.hi) for r in msg.ranks),
            current_round=msg.current_round,
        )

    def dialed_at(self, address: str) -> PeerInfo:
        """This answer with every rank served on a wildcard host (a site listening on all its
        interfaces) given the host it was reached at, ``address``'s."""
        host = address.rpartition(":")[0]
        ranks = tuple(
            replace(r, address=f"{host}:{r.address.rpartition(':')[2]}")
            if r.address.rpartition(":")[0] in ("0.0.0.0", "[::]", "::")
            else r
            for r in self.ranks
        )
        return replace(self, ranks=ranks)

    def problems(self) -> list[str]:
        """What makes this rank table unusable: the ranks must be ``0..nproc-1`` in order,
        each owning exactly ``rank_range(flat_size, nproc, rank)``, so they partition
        ``[0, flat_size)`` (an empty list means usable)."""
        if not 1 <= self.nproc <= MAX_RANKS:
            return [f"nproc {self.nproc} not in [1, {MAX_RANKS}]"]
        if not 1 <= self.flat_size <= MAX_FLAT_SIZE:
            return [f"flat_size {self.flat_size} not in [1, {MAX_FLAT_SIZE}]"]
        if len(self.ranks) != self.nproc:
            return [f"{len(self.ranks)} ranks listed for nproc {self.nproc}"]
        for i, r in enumerate(self.ranks):
            want = rank_range(self.flat_size, self.nproc, i)
            if r.rank != i or (r.lo, r.hi) != want:
                return [f"rank {r.rank} at position {i} owns [{r.lo},{r.hi}), not {list(want)}"]
            if not r.address or len(r.address) > MAX_ADDRESS:
                return [f"rank {i} has an address of {len(r.address)} characters"]
        return []


@dataclass
class ReceivedSegment:
    """An opaque (non-raw) segment as sent by an owner rank: its own flat range and bytes."""

    lo: int
    hi: int
    codec: str
    dtype: str
    data: bytearray
    rank: int


@dataclass
class PullResult:
    """Outcome of one pull. ``ok`` False means: treat this partner as absent this round.

    For raw payloads ``data`` is a writable byte memoryview of exactly the elements
    ``[lo, hi)``, bitwise as published (over the caller's ``out`` buffer when one was given);
    for opaque codecs ``segments`` holds the owner segments covering ``[lo, hi)``, sorted.
    """

    peer: str
    round: int
    stream: str
    lo: int
    hi: int
    ok: bool = False
    data: memoryview | None = None
    segments: list[ReceivedSegment] = field(default_factory=list)
    error: GossipError | None = None
    bytes_recv: int = 0
    seconds: float = 0.0
    retries: int = 0

    @property
    def cause(self) -> str:
        """'' when ok, else the failure counter name (unavailable, timeout, bad_payload, ...)."""
        return "" if self.ok else (self.error.cause if self.error else "rpc")

    def raise_for_error(self) -> None:
        """Raise the typed ``GossipError`` of a failed pull (no-op when ok)."""
        if not self.ok:
            raise self.error or GossipError("pull failed", peer=self.peer)
