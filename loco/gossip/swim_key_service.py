"""The ``Swim.Key`` RPC (protos/loco/v1/swim.proto): pairwise SWIM keys handed out over mTLS.

Server side: :func:`key_handler` answers a member with ``K(this site -> caller)``, the caller
named by its certificate (never by the request). Client side: :class:`KeyFetcher` fetches the
keys of the senders this site needs, one at a time on a worker thread, at most once per
``min_interval_s`` per sender, only for configured members, and installs them into
:class:`~loco.gossip.swim_keys.PairKeys`: asked for (a datagram under a key this site lacks),
and every ``min_interval_s`` for each member whose key it still lacks (one not started yet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from ._pb import swim_pb2
from .errors import from_rpc_error
from .swim_keys import KEY_BYTES, PairKeys

log = logging.getLogger(__name__)
SERVICE = "loco.v1.Swim"
KeySource = Callable[[str], bytes]  # caller's site -> the key this site MACs to it with


def key_handler(admission, site: str,
                source: Callable[[], KeySource | None]) -> grpc.GenericRpcHandler:  # fmt: skip
    """The ``Swim`` service of the gossip server of ``site``; ``source()`` is its key source
    (None: no SWIM under mTLS here, FAILED_PRECONDITION)."""

    def key(req: swim_pb2.SwimKeyRequest, context) -> swim_pb2.SwimKeyResponse:
        caller = admission.authorize(context)
        keys = source()
        if not caller or keys is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no SWIM keys under mTLS here")
        return swim_pb2.SwimKeyResponse(site=site, key=keys(caller))

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Key": grpc.unary_unary_rpc_method_handler(
                key,
                request_deserializer=swim_pb2.SwimKeyRequest.FromString,
                response_serializer=swim_pb2.SwimKeyResponse.SerializeToString,
            )
        },
    )


def fetch_key(client, address: str, site: str, timeout_s: float) -> bytes:
    """``K(site -> this client's site)`` from ``site``'s server at ``address`` over mTLS (the
    server certificate must name ``site``); raises GossipError, or ValueError for an answer
    that is no key."""
    call = client._channel(address, site).unary_unary(
        f"/{SERVICE}/Key",
        request_serializer=swim_pb2.SwimKeyRequest.SerializeToString,
        response_deserializer=swim_pb2.SwimKeyResponse.FromString,
    )
    req = swim_pb2.SwimKeyRequest(site=client.site)
    try:
        resp = call(req, timeout=timeout_s)
    except grpc.RpcError as e:
        raise from_rpc_error(e, site) from None
    client.metrics.add("swim_bytes", req.ByteSize() + resp.ByteSize())  # membership traffic
    if len(resp.key) != KEY_BYTES or resp.site != site:
        raise ValueError(f"{site}: Swim.Key answered {len(resp.key)} bytes as {resp.site[:64]!r}")
    return resp.key


class KeyFetcher:
    """Fetches the SWIM keys of configured members into ``keys`` (see the module docstring).

    ``want(name)`` asks for a member's key (cheap, callable from the UDP thread; repeated or
    unknown names are ignored); ``counts`` holds ``fetched`` / ``failed`` / ``throttled``.
    """

    def __init__(self, *, client, keys: PairKeys, addresses: dict[str, str],
                 timeout_s: float, min_interval_s: float) -> None:  # fmt: skip
        self.client, self.keys, self.addresses = client, keys, dict(addresses)
        self.timeout_s, self.min_interval_s = timeout_s, min_interval_s
        self.counts = {"fetched": 0, "failed": 0, "throttled": 0}
        self._pending: set[str] = set()
        self._last: dict[str, float] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="swim-keys", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=self.timeout_s + 1)

    def _due(self) -> set[str]:
        """Configured members whose key is missing and last tried ``min_interval_s`` ago."""
        now = time.monotonic()
        return {
            n for n in self.addresses
            if not self.keys.has_key(n) and now - self._last.get(n, -1e9) >= self.min_interval_s
        }  # fmt: skip

    def want(self, name: str) -> None:
        if name not in self.addresses:
            return
        with self._cv:
            if name in self._pending:
                return
            if time.monotonic() - self._last.get(name, -1e9) < self.min_interval_s:
                self.counts["throttled"] += 1
                return
            self._pending.add(name)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait(self.min_interval_s)
                    self._pending |= self._due()
                if self._stop:
                    return
                name = min(self._pending)
                self._pending.discard(name)
                self._last[name] = time.monotonic()
            try:
                key = fetch_key(self.client, self.addresses[name], name, self.timeout_s)
            except Exception as e:  # noqa: BLE001 (the fetch thread must not die)
                self.counts["failed"] += 1
                log.debug("SWIM key of %s not fetched: %s", name, e)
                continue
            if self.keys.install(name, key):
                self.counts["fetched"] += 1
