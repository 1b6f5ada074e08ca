"""A direct path to the generation routes, skipping FastAPI's per-request machinery.

FastAPI stays the one place a route is declared (path, body model, docs, OpenAPI). For the routes
whose only inputs are one pydantic body and the gateway/record dependencies, this pure ASGI
middleware calls the same endpoint function itself: the body is validated straight from its bytes
by pydantic-core, and the dependencies are handed over as they are. That skips routing by regex,
dependency solving, the request object, a `json.loads` + Python-side validation pass and two
exception middlewares: about half of the gateway's CPU per request. Errors go through the same
`error_response` as FastAPI's handlers, with the same validation errors FastAPI would raise.
"""

from __future__ import annotations

import email.message
import json
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import get_gateway, get_record
from service.errors import error_response

Endpoint = Callable[..., Awaitable[Any]]
MISSING_BODY = {"type": "missing", "loc": ("body",), "msg": "Field required"}
# FastAPI hands a body that is not declared JSON to validation as bytes: "not an object".
NOT_AN_OBJECT = {
    "type": "model_attributes_type",
    "loc": ("body",),
    "msg": "Input should be a valid dictionary or object to extract fields from",
}
KNOWN_DEPENDENCIES: dict[Any, str] = {get_gateway: "gateway", get_record: "record"}


@dataclass(frozen=True)
class DirectRoute:
    """One POST route this middleware serves: its endpoint and how to call it."""

    endpoint: Endpoint
    body_model: type[BaseModel]
    body_param: str
    gateway_param: str | None
    record_param: str | None


def direct_routes(app: FastAPI) -> dict[str, DirectRoute]:
    """The app's POST routes whose parameters are exactly one pydantic body and known dependencies."""
    found: dict[str, DirectRoute] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"} or route.param_convertors:
            continue
        dependant = route.dependant
        plain = (
            dependant.query_params,
            dependant.header_params,
            dependant.cookie_params,
            dependant.path_params,
        )
        if any(plain) or len(dependant.body_params) != 1:
            continue
        body = dependant.body_params[0]
        model = body.field_info.annotation
        calls = {sub.call: sub.name for sub in dependant.dependencies}
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or not _returns_response(route):
            continue
        if any(call not in KNOWN_DEPENDENCIES or sub_dependencies(call, dependant) for call in calls):
            continue
        names = {KNOWN_DEPENDENCIES[call]: name for call, name in calls.items()}
        found[route.path] = DirectRoute(
            route.endpoint, model, body.name, names.get("gateway"), names.get("record")
        )
    return found


def _returns_response(route: APIRoute) -> bool:
    """Endpoints that build their own Response (others need FastAPI's response_model handling)."""
    returns = typing.get_type_hints(route.endpoint).get("return")
    return isinstance(returns, type) and issubclass(returns, Response)


def sub_dependencies(call: Any, dependant: Any) -> bool:
    """Whether the dependency `call` has dependencies of its own (then FastAPI must solve it)."""
    return any(sub.call is call and sub.dependencies for sub in dependant.dependencies)


def _is_json(content_type: bytes | None) -> bool:
    """FastAPI's rule: parse the body as JSON only for application/json or application/*+json."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    is_json = subtype == "json" or subtype.endswith("+json")
    return message.get_content_maintype() == "application" and is_json


def validation_error(exc: ValidationError) -> RequestValidationError:
    """pydantic's errors for a body, located as FastAPI locates them (under `body`)."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        errors.append({**error, "loc": ("body", *error.get("loc", ()))})
    return RequestValidationError(errors)


class DirectRoutes:
    """Serves the direct routes; every other request goes on to FastAPI."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self.routes = direct_routes(api)
        self._json_types: dict[bytes, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
            if body is None:
                return  # the client left while sending
            request = self._parse(route, scope, body)
            kwargs: dict[str, Any] = {route.body_param: request}
            if route.gateway_param:
                kwargs[route.gateway_param] = self.api.state.gateway
            if route.record_param:
                kwargs[route.record_param] = scope["state"]["record"]
            response: Response = await route.endpoint(**kwargs)
        except Exception as exc:
            response, counted = error_response(exc)
            record = scope.get("state", {}).get("record")
            if record is not None and counted is not None:
                record.failed(counted)
        await response(scope, receive, send)

    def _parse(self, route: DirectRoute, scope: Scope, body: bytes) -> BaseModel:
        if not body:
            raise RequestValidationError([MISSING_BODY])
        if not self._content_is_json(scope):
            # FastAPI hands a non-JSON body to validation as bytes: "not an object".
            message = "Input should be a valid dictionary or object to extract fields from"
            raise RequestValidationError(
                [{"type": "model_attributes_type", "loc": ("body",), "msg": message}]
            )
        try:
            return route.body_model.model_validate_json(body)
        except ValidationError as exc:
            if exc.errors()[0]["type"] != "json_invalid":
                raise validation_error(exc) from None
        # pydantic's parser refused the bytes. Parse them as FastAPI does (json.loads accepts what
        # pydantic's parser does not, e.g. a lone surrogate escape, which validation then names).
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            where = {"loc": ("body", exc.pos), "ctx": {"error": exc.msg}}
            raise RequestValidationError(
                [{"type": "json_invalid", "msg": "JSON decode error", **where}]
            ) from None
        except ValueError:  # not UTF-8/16/32 text
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from None
        try:
            return route.body_model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def _content_is_json(self, scope: Scope) -> bool:
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
                break
        if content_type is None:
            return False
        known = self._json_types.get(content_type)
        if known is None:
            known = _is_json(content_type)
            if len(self._json_types) < 64:  # a handful of spellings in practice; bounded anyway
                self._json_types[content_type] = known
        return known


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
