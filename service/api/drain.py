"""Graceful drain on SIGTERM.

1. `/ready` turns 503 at once, so load balancers stop sending new requests here;
2. for `accept_window` seconds new requests are still served (a balancer, or a Kubernetes Service
   whose endpoints have not caught up yet, may still route some here: refusing them would be a 503
   during every rollout);
3. then new requests get 503 `shutting_down`, and requests in flight get `timeout` seconds to finish;
4. streams still open are ended cleanly (an SSE error event, then `[DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import reject
from service.errors import ShuttingDown
from service.workers.transport import UpstreamStream

log = logging.getLogger(__name__)


class Drain:
    """Shutdown state shared by the routes, the streams and the server."""

    def __init__(self, timeout: float, accept_window: float = 0.0) -> None:
        self.timeout = timeout
        self.accept_window = accept_window
        self.stopping = False  # SIGTERM seen: not ready any more
        self.draining = False  # new requests are refused
        self.in_flight = 0
        self.idle = asyncio.Event()  # set whenever nothing is in flight
        self.idle.set()
        self.streams: set[UpstreamStream] = set()

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
        """Turn unready, keep accepting for the window, then refuse new work, wait for what is in
        flight, and end the streams still open."""
        self.stopping = True
        if self.accept_window > 0:
            log.info("stopping: not ready; still accepting requests for %g s", self.accept_window)
            await asyncio.sleep(self.accept_window)
        self.draining = True
        log.info("draining: %d request(s) in flight, up to %g s", self.in_flight, self.timeout)
        await self._until_idle(self.timeout)
        if self.streams:
            log.warning("drain time is up: ending %d stream(s)", len(self.streams))
        for watch in list(self.streams):
            watch.end(ShuttingDown("The gateway is shutting down; this stream was ended early."))
        await self._until_idle(2.0)  # let ended streams write their last events


class DrainMiddleware:
    """Counts requests in flight and refuses new ones (503, Retry-After) while draining."""

    def __init__(self, app: ASGIApp, drain: Drain, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.drain = drain
        self.exempt = exempt  # probes and metrics keep answering

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            refused = ShuttingDown("The gateway is shutting down; retry on another instance.")
            await reject(scope, receive, send, refused)
            return
        self.drain.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.finished()
