"""grpc.health.v1 for a rank's gossip server: members only, like every RPC.

``Check`` answers SERVING for ``""`` and ``loco.v1.Gossip``. ``Watch`` holds a stream slot,
sends the status, then ends by itself (OK) when the caller leaves, at its deadline, when the
server stops, or after ``max_wait_s``; watchers re-Watch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from ._pb import health_pb2, health_pb2_grpc
from .admission import Admission

SERVICE = "loco.v1.Gossip"


class HealthService(health_pb2_grpc.HealthServicer):
    """Health of one rank's server; ``stopping`` is set when the server stops."""

    _known = ("", SERVICE)

    def __init__(self, admission: Admission, max_wait_s: float, stopping: threading.Event):
        self.admission, self.max_wait_s, self._stopping = admission, max_wait_s, stopping

    def Check(self, request, context):  # noqa: N802 (gRPC naming)
        self.admission.authorize(context)
        if request.service not in self._known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def Watch(self, request, context):  # noqa: N802
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if request.service in self._known
            else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        )
        yield from self._watch(status, context)

    def _watch(self, status: int, context) -> Iterator[health_pb2.HealthCheckResponse]:
        release = self.admission.hold(context, self.admission.authorize(context))
        try:
            yield health_pb2.HealthCheckResponse(status=status)
            left = context.time_remaining()
            end = time.monotonic() + (
                self.max_wait_s if left is None else min(left, self.max_wait_s)
            )
            while context.is_active() and not self._stopping.is_set():
                wait = end - time.monotonic()
                if wait <= 0:
                    break
                self._stopping.wait(min(wait, 0.25))
        finally:
            release()
