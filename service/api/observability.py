"""Request ids, and the record of every counted request, opened on arrival and reported when it
ends however it ends. A pure ASGI middleware (no BaseHTTPMiddleware: it hides disconnects and costs
throughput)."""

from __future__ import annotations

import itertools
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.ops.logs import request_id_var
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.tracing import Tracing

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")  # visible ASCII, bounded: safe to log and echo
SERVER_TIMING = b"server-timing"
TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


class ObservabilityMiddleware:
    """Gives every request an id (the client's `X-Request-Id` if sane, else a new one), echoes it on
    the response, and reports every generation request when it ends, however it ends."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        labels: dict[str, str],
        tracing: Tracing | None = None,
        shared: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.labels = labels  # path -> metric label of the endpoints whose requests are recorded
        self.tracing = tracing
        self.shared = shared  # labelled paths that also have GET or DELETE routes (not recorded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, traceparent = _ids_of(scope)
        endpoint = self.labels.get(scope["path"])
        if endpoint is not None and scope["method"] != "POST" and scope["path"] in self.shared:
            endpoint = None  # e.g. GET /adapters: not the POST endpoint's request
        record = RequestRecord(self.metrics, request_id, endpoint) if endpoint else None
        tracing = self.tracing
        if record is not None:
            if tracing is not None:
                record.span = tracing.server_span(
                    scope["method"], scope["path"], scope["headers"], request_id
                )
                record.trace_id = format(record.span.get_span_context().trace_id, "032x")
            elif traceparent is not None:  # logged even with tracing off
                match = TRACEPARENT.match(traceparent)
                record.trace_id = match.group(1).decode() if match else None
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["record"] = record
        token = request_id_var.set(request_id)
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
                if record is not None:
                    record.status = message["status"]
                    message["headers"].append(_server_timing(record))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if record is not None:
                record.finish()
                if record.span is not None and tracing is not None:
                    tracing.end_server_span(record)
            request_id_var.reset(token)


# Request ids: a per-process random prefix and a counter (unique, and no system call per request).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


def _server_timing(record: RequestRecord) -> tuple[bytes, bytes]:
    """`Server-Timing: gateway;dur=…, upstream;dur=…` (milliseconds so far: for a stream, the worker's
    time until its first event; the rest of the stream is the worker's)."""
    gateway, upstream = record.split(time.perf_counter())
    return SERVER_TIMING, f"gateway;dur={gateway * 1e3:.3f}, upstream;dur={upstream * 1e3:.3f}".encode()


def _ids_of(scope: Scope) -> tuple[str, bytes | None]:
    """The request id (the caller's if sane, else a new one) and the caller's `traceparent`, in one
    pass over the headers."""
    request_id = traceparent = None
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and VALID_REQUEST_ID.match(value):
            request_id = str(value.decode())
        elif name == b"traceparent":
            traceparent = value
    return request_id or f"{_ID_PREFIX}{next(_ids):016x}", traceparent  # 32 hex characters, as a uuid4
