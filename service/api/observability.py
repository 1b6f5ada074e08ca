"""Request ids, and the record of every counted request, opened on arrival and reported when it
ends however it ends. A pure ASGI middleware (no BaseHTTPMiddleware: it hides disconnects and costs
throughput)."""

from __future__ import annotations

import itertools
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.ops.logs import request_id_var
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")  # visible ASCII, bounded: safe to log and echo


class ObservabilityMiddleware:
    """Gives every request an id (the client's `X-Request-Id` if sane, else a new one), echoes it on
    the response, and reports every generation request when it ends, however it ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics, labels: dict[str, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.labels = labels  # path -> metric label of the endpoints whose requests are recorded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        endpoint = self.labels.get(scope["path"])
        record = RequestRecord(self.metrics, request_id, endpoint) if endpoint else None
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
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if record is not None:
                record.finish()
            request_id_var.reset(token)


# Request ids: a per-process random prefix and a counter (unique, and no system call per request).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and VALID_REQUEST_ID.match(value):
            return str(value.decode())
    return f"{_ID_PREFIX}{next(_ids):016x}"  # 32 hex characters, as a uuid4 would be
