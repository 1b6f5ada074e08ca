"""Graceful drain on SIGTERM: /ready turns 503 at once, new requests get 503, requests in flight
get `drain_timeout` seconds to finish, then remaining streams are ended cleanly (an SSE error
event, then `[DONE]`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import GatewayError, error_body

log = logging.getLogger(__name__)

NOT_DRAINED = frozenset({"/health", "/ready", "/metrics"})


class ShuttingDown(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "shutting_down"


class StreamWatch:
    """Lets the drain end one stream early: it closes the stream's upstream response, and the
    relay, seeing `ending`, sends the client an error event and `[DONE]`."""

    def __init__(self, close: Callable[[], object]) -> None:
        self.close = close
        self.ending: str | None = None

    def end(self, reason: str) -> None:
        self.ending = reason
        self.close()


class Drain:
    """Shutdown state shared by the routes, the streams and the server."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()  # set whenever nothing is in flight
        self.idle.set()
        self.streams: set[StreamWatch] = set()

    def started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()

    async def _until_idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout=seconds)

    async def run(self) -> None:
        """Refuse new work, wait for what is in flight, end the streams still open."""
        self.draining = True
        log.info("draining: %d request(s) in flight, up to %g s", self.in_flight, self.timeout)
        await self._until_idle(self.timeout)
        if self.streams:
            log.warning("drain time is up: ending %d stream(s)", len(self.streams))
        for watch in list(self.streams):
            watch.end("The gateway is shutting down; this stream was ended early.")
        await self._until_idle(2.0)  # let ended streams write their last events


class DrainMiddleware:
    """Counts requests in flight and refuses new ones (503, Retry-After) while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NOT_DRAINED:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = error_body("The gateway is shutting down; retry on another instance.",
                              "service_unavailable", code="shutting_down")  # fmt: skip
            response = JSONResponse(
                body, status_code=503, headers={"Retry-After": "1", "Connection": "close"}
            )
            await response(scope, receive, send)
            return
        self.drain.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.finished()
