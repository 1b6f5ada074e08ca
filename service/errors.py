"""Typed gateway errors and the one place that turns every failure into OpenAI's error envelope.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── ContextLengthExceeded     400 invalid_request_error / context_length_exceeded
    │   └── NotAChatModel             400 invalid_request_error / model_not_chat (param: model)
    ├── Unauthorized                  401 invalid_request_error / invalid_api_key, WWW-Authenticate
    ├── Forbidden                     403 permission_error (a key that may not do this; code: the rule)
    ├── ModelNotFound                 404 invalid_request_error / model_not_found (param: model)
    ├── AdapterNotFound               404 invalid_request_error / adapter_not_found (operator API)
    ├── RouteNotFound                 404 not_found_error / route_not_found
    ├── KeyNotFound                   404 invalid_request_error / key_not_found (an operator route)
    ├── TooManyKeys                   409 invalid_request_error / too_many_keys (GATEWAY_MAX_KEYS live keys)
    ├── MethodNotAllowed              405 invalid_request_error / method_not_allowed, with Allow
    ├── RequestTimeout                408 invalid_request_error / body_timeout (or header_timeout)
    ├── RequestTooLarge               413 invalid_request_error / request_too_large
    ├── HeadersTooLarge               431 invalid_request_error / headers_too_large
    ├── RateLimited                   429 rate_limit_error / rate_limit_exceeded, with Retry-After
    ├── TooManyFailedKeys             429 rate_limit_error / too_many_failed_attempts, with Retry-After
    ├── TooManyInFlight               429 rate_limit_error / concurrency_limit_exceeded, with Retry-After
    ├── BudgetExceeded                429 rate_limit_error / token_budget_exceeded (the numbers; Retry-After)
    ├── LimitsUnavailable             503 service_unavailable / limits_unavailable, with Retry-After
    ├── StoreUnavailable              503 service_unavailable / store_unavailable, with Retry-After
    ├── AdapterChanged                503 service_unavailable / adapter_changed (its files changed since)
    ├── KeyUncheckable                503 service_unavailable / key_uncheckable (store away: new/stale key)
    ├── NoHealthyWorker               503 service_unavailable
    │   └── WorkersRefuseKey          502 upstream_error / worker_auth_failed (each refused our key)
    ├── Overloaded                    503 service_unavailable / overloaded, with Retry-After
    ├── TooManyConnections            503 service_unavailable / too_many_connections
    ├── ShuttingDown                  503 service_unavailable / shutting_down, with Retry-After
    ├── UpstreamRejected              the worker's own 4xx status and envelope, passed through
    ├── VllmRefusal                   what vLLM answers for an input it refuses itself, in its envelope
    ├── NotServedByWorker             501 not_implemented (the worker has no such route)
    ├── UpstreamUnavailable           502 upstream_error (connection refused, reset, malformed answer)
    │   └── AdapterLoadFailed         502 upstream_error / adapter_load_failed (a worker did not load it)
    │   └── WorkerAuthFailed          502 upstream_error / worker_auth_failed (a worker refused our key)
    ├── UpstreamTimeout               504 timeout
    └── ClientDisconnected            499 (nobody reads it; counted as a disconnect, not an error)

`retryable` on an upstream error means the worker failed before it could have produced anything:
the request may go to another replica (and, for a stale pooled connection, to the same one).

Envelope: {"error": {"message", "type", "param", "code"}}. Messages never carry stack traces.
This module knows nothing of HTTP frameworks: every layer may raise these. `service.api.errors` is the
one place that turns a failure into a response and counts it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE_CHARS = 1000


LARGEST_SHOWN = 10**15


def shown(number: int, grouped: bool = False) -> str:
    """A count for a message, `1,234` when `grouped`; past 10^15 said in words (Python refuses to write an
    integer of over 4,300 digits, and a client may send one)."""
    if abs(number) >= LARGEST_SHOWN:
        return "more than 10^15"
    return f"{number:,}" if grouped else str(number)


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


class KeyNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "key_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"No API key has the id or name '{_clip(key, 100)}'; GET /keys lists them.", param="key"
        )


class TooManyKeys(GatewayError):
    """A new key beyond GATEWAY_MAX_KEYS live ones (per-key state and metric series are bounded by it)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "too_many_keys"

    def __init__(self, live: int, most: int) -> None:
        super().__init__(
            f"This gateway already has {live:,} live API keys, the most it allows (GATEWAY_MAX_KEYS = "
            f"{most:,}): revoke keys that are no longer used (DELETE /keys/{{key}}) or raise the setting."
        )


class RouteNotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"
    code = "route_not_found"

    def __init__(self) -> None:
        super().__init__("There is no such route; GET /openapi.json lists them.")


class MethodNotAllowed(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, allowed: str) -> None:
        super().__init__(f"This endpoint only accepts {allowed}.")
        self.headers = {"Allow": allowed}


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
        self.model = _clip(model, 200)
        self.known = known


class AdapterNotFound(GatewayError):
    """The operator named an adapter that is not registered."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "adapter_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(known) if known else "none"
        super().__init__(f"There is no adapter '{_clip(name, 200)}'. Adapters: {listed}.", param="name")


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    DEFAULT = "Missing or invalid API key: send `Authorization: Bearer <key>`."

    def __init__(self, message: str = DEFAULT) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    """A known key that may not do this (an operator route without an operator key, a model its policy
    leaves out): the message names the rule."""

    status_code = 403
    error_type = "permission_error"


class RequestTimeout(GatewayError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "body_timeout"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.headers = {"Connection": "close"}


class HeadersTooLarge(GatewayError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request line and headers are over {limit} bytes.")


class TooManyConnections(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "too_many_connections"

    def __init__(self) -> None:
        super().__init__("The gateway has too many open connections; retry shortly.")


class RequestTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is over the {limit}-byte limit.")
        self.headers = {"Connection": "close"}


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, limit: str, retry_after: int) -> None:
        super().__init__(f"Rate limit of {limit} exceeded for this API key.")
        self.headers = {"Retry-After": str(retry_after)}


class TooManyFailedKeys(GatewayError):
    """A client address sent too many wrong keys: refused before any key is compared."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_failed_attempts"

    def __init__(self, retry_after: str) -> None:
        super().__init__("Too many failed API-key attempts from this address; retry later.")
        self.headers = {"Retry-After": retry_after}


class TooManyInFlight(GatewayError):
    """A key with a cap on requests in flight at once has that many open (across every process and pod)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "concurrency_limit_exceeded"

    def __init__(self, cap: int) -> None:
        super().__init__(
            f"This API key may have at most {cap} request(s) in progress at once; wait for one to finish."
        )
        self.headers = {"Retry-After": "1"}


class BudgetExceeded(GatewayError):
    """A request's most possible tokens do not fit what is left of its key's token budget."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "token_budget_exceeded"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, param="max_tokens")
        self.headers = headers


class LimitsUnavailable(GatewayError):
    """A key's limits need the store (more allowance than this process holds) and it cannot be reached."""

    status_code = 503
    error_type = "service_unavailable"
    code = "limits_unavailable"

    def __init__(self, what: str) -> None:
        super().__init__(
            f"This API key's {what} cannot be checked right now (the gateway's database is unreachable and "
            "this process holds no more of it); retry shortly."
        )
        self.headers = {"Retry-After": "1"}


class StoreUnavailable(GatewayError):
    """An operator request that needs the database while it cannot be reached."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"

    def __init__(self) -> None:
        super().__init__("The gateway's database is unreachable right now; retry shortly.")
        self.headers = {"Retry-After": "1"}


class AdapterChanged(GatewayError):
    """An adapter's files changed or went missing since it was checked and taken in: a worker that reads
    them again (it dropped the adapter from memory) would fail, and vLLM's engine dies of such a read,
    taking every model and adapter of the worker with it. Nothing is sent until an operator acts."""

    status_code = 503
    error_type = "service_unavailable"
    code = "adapter_changed"

    def __init__(self, adapter: str) -> None:
        super().__init__(
            f"The adapter '{adapter}' is not served right now: its files changed or went missing after it "
            "was registered. An operator must register it again (remove, then add; for an adapter of the "
            "models file, restart the gateway)."
        )


class KeyUncheckable(GatewayError):
    """A key this process does not know while the store cannot be reached (it may be a new one)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "key_uncheckable"

    # One message whether the process knows the key or not: the answer must not tell a guess it is right.
    UNKNOWN = (
        "This API key cannot be checked right now: this gateway process cannot reach its database (a key "
        "created or revoked since it last read them is not known to it); retry shortly."
    )
    STALE = UNKNOWN

    def __init__(self, message: str = UNKNOWN) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


class KeysUnknowable(KeyUncheckable):
    """A gateway that needed no key so far, cut off from its store past its hold: a first key may have
    been created elsewhere, so it cannot tell whether the request needs one (no failed attempt)."""

    def __init__(self) -> None:
        super().__init__(
            "This gateway process cannot reach its database, so it cannot tell whether API keys are required "
            "now (one may have been created since it last read them); retry shortly."
        )


class NoHealthyWorker(GatewayError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, model: str) -> None:
        super().__init__(f"No healthy worker for model '{model}' right now; retry shortly.")


class WorkersRefuseKey(NoHealthyWorker):
    """No worker of a model is healthy because each refused the gateway's own key: the gateway's
    configuration, not a moment to wait out (so a 502, like `WorkerAuthFailed`, not a 503)."""

    status_code = 502
    error_type = "upstream_error"
    code = "worker_auth_failed"

    def __init__(self, model: str, status: int) -> None:
        GatewayError.__init__(
            self,
            f"The gateway could not authenticate to the workers of model '{model}' (they answer HTTP "
            f"{status}): the gateway's worker key (GATEWAY_WORKER_API_KEY) is not the one they require. "
            "This is the gateway's configuration, not your request.",
        )


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


class VllmRefusal(GatewayError):
    """What vLLM itself answers for an input it refuses, word for word and in its envelope (`type` as
    vLLM names it, the status as an integer `code`): a /v1 request the gateway must refuse before a
    worker sees it gets the answer vLLM would have given (clients match on these)."""

    error_type = "invalid_request_error"  # how it is counted, as the gateway's own refusals are

    def __init__(self, status_code: int, vllm_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code
        self.vllm_type = vllm_type

    def envelope(self) -> dict[str, Any]:
        # Not clipped: vLLM's own validation message lists up to ten errors of up to 1,000 characters.
        return {"error": {"message": self.message, "type": self.vllm_type, "param": self.param,
                          "code": self.status_code}}  # fmt: skip


class ShuttingDown(GatewayError):
    """The gateway is draining: new work goes elsewhere; open streams are ended with this."""

    status_code = 503
    error_type = "service_unavailable"
    code = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1", "Connection": "close"}


class NotServedByWorker(GatewayError):
    """The worker answered a plain 404 for a route it should serve (an older vLLM, say)."""

    status_code = 501
    error_type = "not_implemented"

    def __init__(self, model: str, path: str) -> None:
        super().__init__(f"The worker for model '{model}' does not serve {path} (its vLLM may be older).")


class UpstreamUnavailable(GatewayError):
    status_code = 502
    error_type = "upstream_error"

    def __init__(
        self, message: str, *, retryable: bool = False, stale: bool = False, eject: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        # A pooled connection found closed by the worker: the same worker may take the retry.
        self.stale = stale
        self.eject = eject  # the worker cannot be reached at all: take it out until it answers a probe


class AdapterLoadFailed(UpstreamUnavailable):
    """A worker could not load an adapter a request needs (another replica may still take the request).
    `reason` is the worker's own account, for logs and the operator: it may name folders."""

    code = "adapter_load_failed"

    def __init__(self, model: str, adapter: str, reason: str) -> None:
        super().__init__(
            f"The worker for model '{model}' could not load the adapter '{adapter}'; the gateway's log says "
            "why.",
            retryable=True,
        )
        self.adapter = adapter
        self.reason = reason


class WorkerAuthFailed(UpstreamUnavailable):
    """A worker refused the gateway's own key (401 or 403): the gateway's configuration is wrong, not the
    client's request. The worker is taken out until it accepts the key; another replica may serve."""

    code = "worker_auth_failed"

    def __init__(self, model: str, status: int) -> None:
        super().__init__(
            f"The gateway could not authenticate to the worker for model '{model}' (it answered HTTP "
            f"{status}): the gateway's worker key (GATEWAY_WORKER_API_KEY) is not the one the worker "
            "requires. This is the gateway's configuration, not your request.",
            retryable=True,
            eject=True,
        )
        self.status = status


class ClientDisconnected(GatewayError):
    """The client left before its answer was ready; the worker's request has been aborted."""

    status_code = 499
    error_type = "client_closed_request"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"

    def __init__(self, message: str, *, retryable: bool = False, eject: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.stale = False
        self.eject = eject


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


# Parts of a pydantic error location that name a validator or a union member, not a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal", "bytes"})
MAX_NAME_SHOWN = 64  # characters of an unknown field's name an error repeats
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")


def _param(loc: Sequence[Any]) -> str | None:
    parts = [
        str(part) for part in loc
        if isinstance(part, int) or (isinstance(part, str) and part != "body" and part not in _TYPE_TAGS
                                     and _FIELD_NAME.match(part))
    ]  # fmt: skip
    return ".".join(parts) or None


def _json_problem(reason: str) -> str:
    if "recursion limit" in reason:
        return "The request body is nested too deeply to be parsed."
    if "escape" in reason or "surrogate" in reason:
        return f"The request body has a \\u escape that is incomplete or is a lone surrogate ({reason})."
    return f"The request body is not valid JSON ({reason})."


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """The first of pydantic's validation errors as a 400 a person understands: the field it is
    about (`param`) and what is wrong, without validator names or the (maybe huge) input."""
    if not errors:
        return InvalidRequest("Invalid request.")
    first = errors[0]
    kind = first.get("type")
    param = _param(first.get("loc", ()))
    if kind == "json_invalid":
        return InvalidRequest(_json_problem(str((first.get("ctx") or {}).get("error", ""))))
    if kind in {"model_attributes_type", "model_type", "dict_type"} and param is None:
        return InvalidRequest("The request body must be a JSON object.")
    if kind == "extra_forbidden":  # the name as sent (any text), cut short: a key may be megabytes long
        location = first.get("loc", ())
        name = str(location[-1]) if location else ""
        name = name if len(name) <= MAX_NAME_SHOWN else name[:MAX_NAME_SHOWN] + "..."
        return InvalidRequest(f"Unrecognized request argument supplied: {name}.", param=name)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return InvalidRequest(f"{param}: {message}{more}" if param else f"{message}{more}", param=param)
