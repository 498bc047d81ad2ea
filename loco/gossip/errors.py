"""Typed gossip errors and the gRPC StatusCode -> loco error table.

Every failure at the client boundary becomes a :class:`GossipError` subclass with a short
``cause`` string (the key used in the failure counters). Training code never sees
``grpc.RpcError``: pulls return a :class:`~loco.gossip.client.PullResult` and only
``PullResult.raise_for_error()`` / ``GossipClient.hello()`` raise, always a ``GossipError``.
"""

from __future__ import annotations

import grpc


class GossipError(Exception):
    """Base class of every error the gossip layer raises; ``cause`` names the counter."""

    cause = "rpc"

    def __init__(self, message: str, *, peer: str = "", code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.peer = peer
        self.code = code


class PeerUnavailable(GossipError):
    """The peer could not be reached (down, never started, connection reset mid-stream)."""

    cause = "unavailable"


class PeerBusy(PeerUnavailable):
    """The peer refused the call for now: its stream caps are full (RESOURCE_EXHAUSTED).
    Retried with backoff within the call's deadline, like a plain UNAVAILABLE."""

    cause = "busy"


class PullTimeout(GossipError):
    """The call's deadline passed (slow peer, round never published, slow link)."""

    cause = "timeout"


class RoundEvicted(GossipError):
    """The requested round is no longer in the peer's mailbox (it keeps the last two)."""

    cause = "evicted"


class PeerMismatch(GossipError):
    """The peer belongs to another run, layout or protocol version."""

    cause = "mismatch"


class AuthError(GossipError):
    """TLS handshake failed, or the peer is not a member of this federation."""

    cause = "auth"


class BadPayload(GossipError):
    """The peer sent a payload that failed validation (header, length, checksum, decode)."""

    cause = "bad_payload"


class PeerBanned(GossipError):
    """The peer is ignored for a few rounds after too many bad payloads."""

    cause = "banned"


class StateMoved(GossipError):
    """The pieces of one FetchState came from different versions of the state (a torn read):
    the source published anew meanwhile. Not the peer's fault; read it again."""

    cause = "moved"


class NotAgreed(GossipError):
    """The peer did not agree to pair with this site this round: its settled group (pairing
    agreement, ``loco.gossip.agree_rpc``) does not hold this site (ABORTED)."""

    cause = "not_agreed"


class BadRequest(GossipError):
    """The request itself was invalid (range outside the flat space, unknown stream)."""

    cause = "bad_request"


_BY_CODE: dict[grpc.StatusCode, type[GossipError]] = {
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: PullTimeout,
    grpc.StatusCode.NOT_FOUND: RoundEvicted,
    grpc.StatusCode.FAILED_PRECONDITION: PeerMismatch,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: BadRequest,
    grpc.StatusCode.OUT_OF_RANGE: BadRequest,
    grpc.StatusCode.DATA_LOSS: BadPayload,
    grpc.StatusCode.RESOURCE_EXHAUSTED: PeerBusy,
    grpc.StatusCode.ABORTED: NotAgreed,
}

_TLS_HINTS = ("ssl", "handshake", "certificate", "tls", "x509", "verification", "unauthenticated")


def from_rpc_error(err: grpc.RpcError, peer: str = "") -> GossipError:
    """Translate a ``grpc.RpcError`` into the matching ``GossipError`` subclass."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    cls = _BY_CODE.get(code, GossipError) if code is not None else GossipError
    if cls is PeerUnavailable and any(h in details.lower() for h in _TLS_HINTS):
        cls = AuthError
    if cls is PeerBusy and "larger than max" in details:  # our receive limit: the peer's bytes
        cls = BadPayload
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{peer}: {name}: {details}", peer=peer, code=code)


def is_retryable(exc: GossipError) -> bool:
    """Only plain UNAVAILABLE (not TLS failures) and RESOURCE_EXHAUSTED (busy) are retried."""
    return type(exc) in (PeerUnavailable, PeerBusy)
