"""The HTTP edge's pieces, each called directly as ASGI (no server, no worker): the dispatcher,
the one error exit, the body and key guards, and the drain."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from service.api.auth import ApiKeyMiddleware
from service.api.body_limit import BodyLimitMiddleware
from service.api.dispatch import Dispatcher
from service.api.drain import Drain, DrainMiddleware
from service.api.endpoint import Endpoint
from service.api.errors import error_exit
from service.core.tenancy import NO_TENANCY
from service.errors import ClientDisconnected, InvalidRequest, Overloaded
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from tests.helpers import AsgiCall, call_asgi, eventually


class Echo(BaseModel):
    text: str


def record() -> RequestRecord:
    return RequestRecord(Metrics(lambda: []), "id", "test")


async def echo(gateway: Any, request: Echo, rec: RequestRecord) -> Response:
    if request.text == "fail":
        raise Overloaded("m", "its queue is full")
    if request.text == "wait":
        await asyncio.sleep(30)
    return JSONResponse({"text": request.text, "gateway": gateway})


class State:
    gateway = "the gateway"
    tenancy = NO_TENANCY


async def not_found(scope: Any, receive: Any, send: Any) -> None:
    await Response(status_code=404)(scope, receive, send)


DISPATCHER = Dispatcher(
    not_found, {"/echo": Endpoint("/echo", "", "t", body=Echo, handler=echo, metric="echo")}, State()
)


async def test_the_dispatcher_validates_from_bytes_and_calls_the_handler() -> None:
    call = await call_asgi(DISPATCHER, "POST", "/echo", b'{"text": "hi"}')
    assert call.status == 200 and call.json() == {"text": "hi", "gateway": "the gateway"}
    assert (await call_asgi(DISPATCHER, "POST", "/elsewhere")).status == 404  # not its route


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"", None, 400, "no body"),
        (b'{"text": 5}', None, 400, "text: Input should be a valid string"),
        (b'{"text": "x"}', {"content-type": "text/plain"}, 400, "Content-Type"),
        (b'{"text": "fail"}', None, 503, "at capacity"),
    ],
)
async def test_the_dispatchers_failures_take_the_exit_and_are_counted(
    body: bytes, headers: dict[str, str] | None, status: int, says: str
) -> None:
    rec = record()
    call = await call_asgi(DISPATCHER, "POST", "/echo", body, headers, state={"record": rec})
    assert call.status == status and says in call.json()["error"]["message"]
    assert rec.error_type == call.json()["error"]["type"]


async def test_the_dispatcher_answers_a_wrong_method_with_405() -> None:
    call = await call_asgi(DISPATCHER, "GET", "/echo")
    assert call.status == 405 and call.headers["allow"] == "POST"


async def test_the_dispatcher_drops_the_work_of_a_client_that_left() -> None:
    rec, call = record(), AsgiCall()
    waiting = call_asgi(DISPATCHER, "POST", "/echo", b'{"text": "wait"}', state={"record": rec}, call=call)
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0.05)
    call.leave.set()
    await asyncio.wait_for(task, timeout=2)  # not the handler's 30 s
    assert rec.disconnected and rec.error_type is None


@pytest.mark.parametrize(
    ("failure", "status", "kind"),
    [
        (InvalidRequest("bad", param="x"), 400, "invalid_request_error"),
        (RequestValidationError([{"type": "missing", "loc": ("body", "text"), "msg": "Field required"}]), 400,
         "invalid_request_error"),
        (HTTPException(status_code=404), 404, "not_found_error"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
)  # fmt: skip
def test_the_exit_maps_every_failure_to_the_envelope_and_counts_it(
    failure: Exception, status: int, kind: str
) -> None:
    rec = record()
    response = error_exit(failure, rec)
    body = json.loads(response.body)
    assert response.status_code == status and body["error"]["type"] == kind
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert rec.error_type == kind
    assert "a bug" not in body["error"]["message"]  # no internals


def test_a_client_that_left_is_a_disconnect_not_an_error() -> None:
    rec = record()
    error_exit(ClientDisconnected("gone"), rec)
    assert rec.disconnected and rec.error_type is None


async def recorder(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    await JSONResponse({"body": message["body"].decode()})(scope, receive, send)


async def test_the_body_guard_refuses_what_is_over_the_limit_and_replays_the_rest() -> None:
    guard = BodyLimitMiddleware(recorder, max_bytes=1024)
    assert (await call_asgi(guard, "POST", "/x", b"a" * 10)).json() == {"body": "a" * 10}
    over = await call_asgi(guard, "POST", "/x", b"a" * 2000)
    assert over.status == 413 and over.json()["error"]["code"] == "request_too_large"


async def test_the_key_guard_checks_keys_and_rates() -> None:
    guard = ApiKeyMiddleware(
        recorder, keys=["k1", "k2"], open_paths=frozenset({"/open"}), rate_limit="2/minute"
    )
    assert (await call_asgi(guard, "POST", "/x", b"b")).status == 401
    assert (await call_asgi(guard, "POST", "/open", b"b")).status == 200
    good = {"authorization": "Bearer k2"}
    assert [(await call_asgi(guard, "POST", "/x", b"b", good)).status for _ in range(3)] == [200, 200, 429]


async def test_the_drain_serves_during_its_window_then_refuses() -> None:
    drain = Drain(timeout=0.5, accept_window=0.2)
    middleware = DrainMiddleware(recorder, drain, exempt=frozenset({"/ready"}))
    running = asyncio.ensure_future(drain.run())
    await eventually(lambda: drain.stopping)
    assert (await call_asgi(middleware, "POST", "/x", b"b")).status == 200  # the accept window
    await eventually(lambda: drain.draining, seconds=2)
    refused = await call_asgi(middleware, "POST", "/x", b"b")
    assert refused.status == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert (await call_asgi(middleware, "POST", "/ready", b"b")).status == 200  # exempt
    await running
