"""The one exit for errors: every failure, raised anywhere as a typed `GatewayError` (or a framework
error: validation, an unknown route), becomes OpenAI's envelope with its status here, and is counted
here on the request's record."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from service.errors import GatewayError, InvalidRequest, MethodNotAllowed, RouteNotFound, invalid_request
from service.ops.record import RequestRecord

log = logging.getLogger(__name__)


def as_gateway_error(exc: Exception) -> GatewayError:
    """Any failure as the typed error it means: framework errors mapped, bugs a 500."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RequestValidationError):
        return invalid_request(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return RouteNotFound()
        if exc.status_code == 405:
            return MethodNotAllowed(", ".join(sorted((exc.headers or {}).get("Allow", "GET").split(", "))))
        return InvalidRequest(str(exc.detail))
    log.exception("unexpected error", exc_info=exc)
    return GatewayError("Internal error in the gateway.")


def error_exit(exc: Exception, record: RequestRecord | None) -> JSONResponse:
    """The one exit: the envelope response for any failure, counted on the request's record."""
    error = as_gateway_error(exc)
    if record is not None:
        record.failed(error)
    return JSONResponse(error.envelope(), status_code=error.status_code, headers=error.headers)


async def reject(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """Answer a raw ASGI request (a middleware refusing it) through the exit."""
    await error_exit(exc, scope.get("state", {}).get("record"))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own failures (its GET routes: validation, unknown routes, bugs) take the exit too."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_exit(exc, getattr(request.state, "record", None))

    for kind in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
