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

from service.errors import ClientDisconnected, GatewayError, error_body, invalid_request

log = logging.getLogger(__name__)


def error_response(exc: Exception) -> tuple[JSONResponse, str | None]:
    """The envelope response for any failure, and the error type to count (None: not an error
    of ours to count, e.g. a client that left). Every path that answers an error comes here."""
    if isinstance(exc, GatewayError):
        counted = None if isinstance(exc, ClientDisconnected) else exc.error_type
        return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers), counted
    if isinstance(exc, RequestValidationError):
        return error_response(invalid_request(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(str(exc.detail), error_type)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers), error_type
    log.exception("unexpected error", exc_info=exc)
    body = error_body("Internal error in the gateway.", "internal_error")
    return JSONResponse(body, status_code=500), "internal_error"


async def reject(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """Answer a raw ASGI request with the envelope for `exc`, counted on its record if it has one."""
    response, counted = error_response(exc)
    record = scope.get("state", {}).get("record")
    if record is not None and counted is not None:
        record.failed(counted)
    await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure, validation included, to the envelope with the right status."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response, counted = error_response(exc)
        record = getattr(request.state, "record", None)
        if record is not None and counted is not None:
            record.failed(counted)
        return response

    for kind in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
