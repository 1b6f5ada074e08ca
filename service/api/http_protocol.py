"""uvicorn's HTTP protocol with the limits it lacks against slow or greedy clients.

uvicorn has no deadline for a request's head: a client that connects and sends nothing, or sends a
header line every minute (slowloris), holds its connection forever, and headers have no size cap.
This subclass of uvicorn's httptools protocol (passed as `uvicorn.Config(http=...)`) adds:
- a head deadline: from connecting (or the first byte of a new request on a kept-alive connection)
  to the end of the headers, else 408 and close;
- a head size cap (request line plus headers), else 431 and close;
- a body deadline: from the end of the head to the end of the body, else 408 and close;
- a cap on open connections, else 503 and close. It holds per serving process, not for the host: what
  it protects (file descriptors under the process's `ulimit -n`, memory, one event loop) is each
  process's own, and a process with room should not refuse because others are busy.
Deadlines are timer handles on the connection (no task or `asyncio.timeout` per request). Every
refusal is a typed error whose
envelope is the answer, and is counted (`gateway_errors_total{endpoint="connection"}`): it happens
before there is a request, so not through the request's record.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import GatewayError, HeadersTooLarge, RequestTimeout, TooManyConnections

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ClientLimits:
    header_timeout: float
    max_header_bytes: int
    max_connections: int
    body_timeout: float = 30.0
    on_refusal: Callable[[GatewayError], None] = lambda error: None  # counts it


def refusal(error: GatewayError) -> bytes:
    """A complete HTTP/1.1 response closing the connection, carrying the error's envelope."""
    body = json.dumps(error.envelope()).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (error.status_code, REASONS[error.status_code], len(body))
    )
    return head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring; `limits` is set on the subclass `guarded_protocol` makes."""

    limits: ClientLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(TooManyConnections())
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:  # count the head before the parser stores any of it
            end = data.find(b"\r\n\r\n")
            size = self._head_bytes + (len(data) if end < 0 else end + 4)
            if size > self.limits.max_header_bytes:
                self._refuse(HeadersTooLarge(self.limits.max_header_bytes))
                return
            self._head_bytes = size
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a new request on a kept-alive connection
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._in_head = False
        self._head_bytes = 0
        # The body's deadline (a request without one completes at once and cancels it).
        self._head_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_head_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head = True  # a kept-alive connection's next request

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        seconds = self.limits.header_timeout
        self._refuse(
            RequestTimeout(f"The request headers did not arrive within {seconds:g} s.", code="header_timeout")
        )

    def _body_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and self.cycle.response_started:
            return  # the app answered without waiting for the body: nothing to refuse
        late = f"The request body did not arrive within {self.limits.body_timeout:g} s."
        self._refuse(RequestTimeout(late))

    def _refuse(self, error: GatewayError) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.limits.on_refusal(error)
            self.transport.write(refusal(error))
            self.transport.close()


def guarded_protocol(limits: ClientLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to `limits`."""
    return type("GatewayHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
