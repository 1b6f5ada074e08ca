"""Serves every POST endpoint of the table, as a pure ASGI layer in front of FastAPI.

The body (already read and size-checked by `body_limit.BodyLimitMiddleware`) is validated straight
from its bytes by pydantic-core and handed to the endpoint's handler with the gateway and the
request's record; FastAPI's routing, dependency solving and second parse are not involved. What
parsing costs grows with the body's arrays and objects, so they are counted (a byte scan) before it;
a large body is validated in a thread, where its Python validators let the loop run (pydantic-core
itself holds the GIL: only the caps bound that part). The
handler runs under a watch on the client: if it leaves while the request is queued, rendering or
waiting for a non-streamed answer, the work is cancelled (and the worker's request aborted).
Errors take the one exit, `service.api.errors.error_exit`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.endpoint import Endpoint
from service.api.errors import error_exit
from service.core.context import RequestContext
from service.core.protocol import Passthrough
from service.errors import InvalidRequest, MethodNotAllowed, invalid_request

INLINE_PARSE_BYTES = 64 * 1024  # bodies up to this size are validated on the loop (well under 1 ms)
DEFAULT_CONTAINERS = 65_536


def is_json(content_type: bytes | None) -> bool:
    """`application/json` or `application/<anything>+json`, parameters ignored."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def json_containers(body: bytes, limit: int) -> int:
    """Arrays and objects in a JSON body: an upper bound (every bracket) while that is within
    `limit`, else the brackets outside strings. Linear whatever the body (no regex that could
    backtrack over an unterminated string): escapes removed, then every other piece between quotes."""
    rough = body.count(b"[") + body.count(b"{")
    if rough <= limit:
        return rough
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # `\\` first: `\\"` ends a string
    outside = b"".join(unescaped.split(b'"')[::2])
    return outside.count(b"[") + outside.count(b"{")


async def parse_body(
    model: type[BaseModel], body: bytes, content_type: bytes | None, max_containers: int = DEFAULT_CONTAINERS
) -> Any:
    """The validated request, or an InvalidRequest that says what is wrong in plain words."""
    if not body:
        raise InvalidRequest("The request has no body; send a JSON object.")
    if not is_json(content_type):
        raise InvalidRequest("Send the request body as JSON, with `Content-Type: application/json`.")
    containers = json_containers(body, max_containers)
    if containers > max_containers:
        raise InvalidRequest(
            f"The request body holds {containers:,} JSON arrays and objects; this gateway allows at most "
            f"{max_containers:,}.",
            code="too_many_json_containers",
        )
    try:
        if len(body) <= INLINE_PARSE_BYTES:
            request = model.model_validate_json(body)
        else:
            request = await asyncio.to_thread(model.model_validate_json, body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False, include_input=False)) from None
    if isinstance(request, Passthrough):
        request.keep_raw(body)
    return request


class Dispatcher:
    """Serves the table's POST endpoints; every other request goes on to FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        endpoints: dict[str, Endpoint],
        state: Any,
        session_header: str = "x-session-id",
        max_json_containers: int = DEFAULT_CONTAINERS,
        other_methods: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.other_methods = other_methods  # paths that also answer GET or DELETE (FastAPI's routes)
        self.state = state  # the app's state: the lifespan puts the gateway there
        self.session_header = session_header.lower().encode("latin-1")
        self.max_json_containers = max_json_containers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or (scope["method"] != "POST" and scope["path"] in self.other_methods):
            await self.app(scope, receive, send)
            return
        state = scope.get("state", {})
        record = state.get("record")
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("POST")
            body = state.get("body")  # read and size-checked by the body guard
            if body is None:
                body = await _read_body(receive)
            if body is None:
                return  # the client left while sending
            assert endpoint.body is not None
            content_type = _header(scope, b"content-type")
            request = await parse_body(endpoint.body, body, content_type, self.max_json_containers)
            handler = endpoint.handler
            assert handler is not None
            session = _header(scope, self.session_header)
            context = RequestContext(
                state.get("request_id", "-"), record, receive, session.decode("latin-1") if session else None
            )
            context.caller = self.state.tenancy.caller(state.get("api_key_id"))
            response: Response = await context.unless_client_leaves(
                handler(self.state.gateway, request, context)
            )
        except Exception as exc:
            response = error_exit(exc, record)
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the common case: one message, no copy
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
