"""How the gateway talks to a worker: a small interface (`Transport`, `UpstreamStream`), implemented
over HTTP by `service.workers.http_transport` and in memory by `service.workers.fake`, plus what is
the same whatever carries the bytes: framing an event stream into whole events, and its deadlines.

Each timeout is enforced by exactly one mechanism and reports what it measured:
- connect, and a whole non-streamed answer: by the transport (aiohttp's `connect` and `total`);
- a stream's first token, from sending the request to its first event (headers included), and the
  gap between two reads after it: by `WatchedStream`, one lazily re-armed timer per stream, so a read
  costs a clock read rather than a timer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from service.errors import GatewayError, UpstreamTimeout
from service.workers.answer import Answer
from service.workers.worker import Worker

# A request body: built here (a dict), or the client's own bytes when nothing in it changes.
Body = dict[str, Any] | bytes


class UpstreamStream(Protocol):
    """An open event stream from a worker."""

    worker: Worker

    def blocks(self) -> AsyncIterator[bytes]:
        """The events as blocks of whole events, as they arrive. Raises typed errors; if `end` was
        called, its reason."""
        ...

    def end(self, reason: GatewayError) -> None:
        """Stop it from outside (a deadline, the drain): the reader raises `reason`."""
        ...

    async def close(self) -> None:
        """Done with it: a finished stream is released, an unfinished one aborted (the worker then
        stops generating)."""
        ...


class Transport(Protocol):
    """Requests to workers; failures come out as typed gateway errors."""

    async def complete(
        self, worker: Worker, path: str, body: Body, headers: dict[str, str] | None = None
    ) -> Answer:
        """A non-streamed request (with extra `headers`, such as `traceparent`); the worker's JSON answer."""
        ...

    async def stream(
        self,
        worker: Worker,
        path: str,
        body: Body,
        ends_with_done: bool,
        headers: dict[str, str] | None = None,
    ) -> UpstreamStream:
        """A streamed request, open once the worker has answered 200; errors before that raise here."""
        ...

    async def health(self, worker: Worker) -> bool:
        """Whether the worker answers its health check."""
        ...

    async def post(self, worker: Worker, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """A small POST to one of the worker's own routes (loading an adapter): its status and body
        (capped), whatever the status; a transport failure raises as `complete` does."""
        ...

    async def get_json(self, worker: Worker, path: str) -> Any:
        """A GET whose answer must be 200 and JSON (ValueError otherwise)."""
        ...

    async def get_text(self, worker: Worker, path: str) -> str:
        """A GET whose answer must be 200 (ValueError otherwise), as text."""
        ...


class OversizedEvent(ValueError):
    """An event stream's event grew over the framer's limit before it ended."""


class SseFramer:
    """Cuts bytes as they arrive into blocks of whole events (one read may carry many events when
    the worker is faster than the client; nothing is split per line here). CRLF line ends are
    normalised. An unfinished event is kept once (each read is searched, never the whole event
    again) and may grow to `limit` bytes at most."""

    def __init__(self, limit: int | None = None) -> None:
        self.pending = bytearray()
        self.limit = limit
        self._cr = False  # the last read ended with a CR that may start a CRLF

    def feed(self, chunk: bytes) -> bytes:
        """The whole events completed by `chunk` (b"" while an event is still incomplete)."""
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n")
        found = chunk.rfind(b"\n\n")
        if found >= 0:
            end = found + 2
        elif self.pending.endswith(b"\n") and chunk.startswith(b"\n"):
            end = 1  # the blank line that ends an event straddles two reads
        else:
            self.pending += chunk
            self._check(len(self.pending))
            return b""
        if not self.pending:
            if end == len(chunk):
                return chunk  # the common case: a read of whole events, passed on without a copy
            self.pending += chunk[end:]
            return chunk[:end]
        self._check(len(self.pending) + end)
        whole = bytes(self.pending) + chunk[:end]
        self.pending = bytearray(chunk[end:])
        return whole

    def _check(self, size: int) -> None:
        if self.limit is not None and size > self.limit:
            raise OversizedEvent(f"an event is over {self.limit} bytes")

    def rest(self) -> bytes:
        """What is left when the stream ends cleanly, as a last event (b"" if nothing)."""
        return bytes(self.pending) + b"\n\n" if self.pending.strip() else b""


def encode(body: Body) -> bytes:
    """A request body as bytes on the wire."""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def sse_payloads(block: bytes) -> list[bytes]:
    """The `data:` payloads of a block of whole events, in order (`[DONE]` included)."""
    return [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]


class WatchedStream:
    """A stream under its two deadlines: the first event by `opened + first_timeout`, then no gap
    longer than `idle_timeout`. One timer, re-armed lazily: a block only records the time; when the
    timer fires it checks whether the stream really was idle that long, and if not re-arms for the
    rest. When a deadline passes, the stream is ended with an UpstreamTimeout naming it."""

    def __init__(
        self, stream: UpstreamStream, opened: float, first_timeout: float, idle_timeout: float
    ) -> None:
        self.stream = stream
        self.worker = stream.worker
        self.first_timeout = first_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.started = False  # the first event has arrived
        self.last = opened
        self.interval = first_timeout
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(opened + first_timeout, self._check)

    async def blocks(self) -> AsyncIterator[bytes]:
        async for block in self.stream.blocks():
            self.last = self.loop.time()
            self.worker.progress_at = self.last  # a sign of progress for health checks (same clock)
            if not self.started:
                self.started = True
                self.interval = self.idle_timeout
                self._arm(self.last + self.interval)
            yield block

    def end(self, reason: GatewayError) -> None:
        self._cancel()
        self.stream.end(reason)

    async def close(self) -> None:
        self._cancel()
        await self.stream.close()

    def _arm(self, when: float) -> None:
        self._cancel()
        self._timer = self.loop.call_at(when, self._check)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        due = self.last + self.interval
        if self.loop.time() >= due - 0.001:
            self.stream.end(
                no_token_in_time(self.worker, self.started, self.idle_timeout, self.first_timeout)
            )
        else:
            self._arm(due)


def no_token_in_time(
    worker: Worker, started: bool, idle_timeout: float, first_timeout: float
) -> UpstreamTimeout:
    waited, seconds = ("next token", idle_timeout) if started else ("first token", first_timeout)
    return UpstreamTimeout(f"The worker for model '{worker.model}' sent no {waited} within {seconds:g} s.")
