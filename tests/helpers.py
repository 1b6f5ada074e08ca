"""Helpers every test tier shares, written once: server-sent events, waiting for a condition,
what the gateway holds, and calling an ASGI app without a server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.core.gateway import Gateway

# ---------------------------------------------------------------- server-sent events


def read_events(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """JSON events of an SSE response, and whether it ended with `data: [DONE]`."""
    events: list[dict[str, Any]] = []
    done = False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def stream_post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """POST a streaming request and collect its events."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)


async def sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response, as text (`[DONE]` included)."""
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def stream_payloads(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    """POST `body` with `stream: true` and return its payloads."""
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return await sse_payloads(response)


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of raw event-stream bytes."""
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


# ---------------------------------------------------------------- waiting, and what is held


async def eventually(condition: Callable[[], object], seconds: float = 10.0, poll: float = 0.01) -> None:
    """Wait until `condition()` is true, failing after `seconds`."""
    for _ in range(max(1, int(seconds / poll))):
        if condition():
            return
        await asyncio.sleep(poll)
    raise AssertionError("condition not met in time")


def outstanding(gateway: Gateway) -> int:
    """Worker slots held across every pool (0 once every request has let go)."""
    return sum(worker.outstanding for pool in gateway.pools.values() for worker in pool.workers)


# ---------------------------------------------------------------- an ASGI app without a server

JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class AsgiCall:
    """One request to an ASGI app, driven by hand: what it sent back, and when the client leaves."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    leave: asyncio.Event = field(default_factory=asyncio.Event)

    def json(self) -> Any:
        return json.loads(self.body)


async def call_asgi(
    app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
    state: dict[str, Any] | None = None, call: AsgiCall | None = None,
) -> AsgiCall:  # fmt: skip
    """Send one request to `app` and collect its answer. `call.leave` set: the client disconnects."""
    call = call or AsgiCall()
    sent_body = False
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or JSON_HEADERS).items()]
    scope = {"type": "http", "method": method, "path": path, "headers": raw_headers, "query_string": b"",
             "state": state if state is not None else {}}  # fmt: skip

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await call.leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            call.status = message["status"]
            call.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            call.body += message.get("body", b"")

    await app(scope, receive, send)
    return call


def wait_until(
    condition: Callable[[], object], seconds: float = 10.0, explain: Callable[[], str] = lambda: ""
) -> None:
    """Wait (blocking) until `condition()` is true, failing after `seconds` with `explain()`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {seconds:g} s\n{explain()}"
        time.sleep(0.05)
