"""Serves every POST endpoint of the table, as a pure ASGI layer in front of FastAPI.

The body (already read and size-checked by `body_limit.BodyLimitMiddleware`) is validated straight
from its bytes by pydantic-core and handed to the endpoint's handler with the gateway and the
request's record; FastAPI's routing, dependency solving and second parse are not involved. The
handler runs under a watch on the client: if it leaves while the request is queued, rendering or
waiting for a non-streamed answer, the work is cancelled (and the worker's request aborted).
Errors take the one exit, `service.api.errors.error_exit`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.endpoint import Endpoint
from service.api.errors import error_exit
from service.core.context import RequestContext
from service.core.protocol import Passthrough
from service.errors import InvalidRequest, MethodNotAllowed, invalid_request


def is_json(content_type: bytes | None) -> bool:
    """`application/json` or `application/<anything>+json`, parameters ignored."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def parse_body(model: type[BaseModel], body: bytes, content_type: bytes | None) -> Any:
    """The validated request, or an InvalidRequest that says what is wrong in plain words."""
    if not body:
        raise InvalidRequest("The request has no body; send a JSON object.")
    if not is_json(content_type):
        raise InvalidRequest("Send the request body as JSON, with `Content-Type: application/json`.")
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False, include_input=False)) from None
    if isinstance(request, Passthrough):
        request.keep_raw(body)
    return request


class Dispatcher:
    """Serves the table's POST endpoints; every other request goes on to FastAPI."""

    def __init__(
        self, app: ASGIApp, endpoints: dict[str, Endpoint], state: Any, session_header: str = "x-session-id"
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.state = state  # the app's state: the lifespan puts the gateway there
        self.session_header = session_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
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
            request = parse_body(endpoint.body, body, _header(scope, b"content-type"))  # type: ignore[arg-type]
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
