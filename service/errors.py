"""Typed gateway errors and the one place that turns every failure into OpenAI's error envelope.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── ContextLengthExceeded     400 invalid_request_error / context_length_exceeded
    │   └── NotAChatModel             400 invalid_request_error / model_not_chat (param: model)
    ├── ModelNotFound                 404 invalid_request_error / model_not_found (param: model)
    ├── NoHealthyWorker               503 service_unavailable
    ├── Overloaded                    503 service_unavailable / overloaded, with Retry-After
    ├── UpstreamRejected              the worker's own 4xx status and envelope, passed through
    ├── UpstreamUnavailable           502 upstream_error (connection refused, reset, malformed answer)
    ├── UpstreamTimeout               504 timeout
    └── ClientDisconnected            499 (nobody reads it; counted as a disconnect, not an error)

Envelope: {"error": {"message", "type", "param", "code"}}. Messages never carry stack traces.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1000


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class NotAChatModel(InvalidRequest):
    code = "model_not_chat"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"'{model}' is a base model: it continues text and has no chat template. "
            "Send raw text to POST /complete (or /v1/completions), or pick an instruct model "
            "for chat (GET /v1/models lists each model's kind).",
            param="model",
        )


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(
            f"The model '{_clip(model, 200)}' does not exist. Served models: {', '.join(known)}.",
            param="model",
        )


class NoHealthyWorker(GatewayError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, model: str) -> None:
        super().__init__(f"No healthy worker for model '{model}' right now; retry shortly.")


class Overloaded(GatewayError):
    """Every worker slot is taken and the queue is full or the wait ran out: come back later."""

    status_code = 503
    error_type = "service_unavailable"
    code = "overloaded"

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"Model '{model}' is at capacity ({why}); retry shortly.")
        self.headers = {"Retry-After": "1"}


class UpstreamRejected(GatewayError):
    """A worker answered 4xx: its status and error object reach the client unchanged."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        raw = body.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {"message": str(body)}
        super().__init__(
            str(error.get("message") or "Rejected by the model worker."), param=error.get("param")
        )
        self.status_code = status_code
        self.error_type = str(error.get("type") or "invalid_request_error")
        self._code = error.get("code")

    def envelope(self) -> dict[str, Any]:
        body = error_body(self.message, self.error_type, self.param)
        body["error"]["code"] = self._code
        return body


class UpstreamUnavailable(GatewayError):
    status_code = 502
    error_type = "upstream_error"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        # True when the worker failed before answering: another replica may serve the request.
        self.retryable = retryable


class ClientDisconnected(GatewayError):
    """The client left before its answer was ready; the worker's request has been aborted."""

    status_code = 499
    error_type = "client_closed_request"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {
        "error": {
            "message": _clip(message, MAX_MESSAGE_CHARS),
            "type": error_type,
            "param": param,
            "code": code,
        }
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """First validation problem as (message, param) without echoing the (maybe huge) input."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error")
        return f"The request body is not valid JSON ({reason}).", None
    if first.get("type") in {"model_attributes_type", "model_type"} and not loc:
        return "The request body must be a JSON object.", None
    message = str(first.get("msg", "invalid value"))
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def error_response(exc: Exception) -> tuple[JSONResponse, str | None]:
    """The envelope response for any failure, and the error type to count (None: not an error
    of ours to count, e.g. a client that left). Every path that answers an error comes here."""
    if isinstance(exc, GatewayError):
        counted = None if isinstance(exc, ClientDisconnected) else exc.error_type
        return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers), counted
    if isinstance(exc, RequestValidationError):
        message, param = _validation_error(exc)
        body = error_body(message, "invalid_request_error", param)
        return JSONResponse(body, status_code=400), "invalid_request_error"
    if isinstance(exc, StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(str(exc.detail), error_type)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers), error_type
    log.exception("unexpected error", exc_info=exc)
    body = error_body("Internal error in the gateway.", "internal_error")
    return JSONResponse(body, status_code=500), "internal_error"


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
