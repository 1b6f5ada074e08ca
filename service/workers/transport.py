"""HTTP to workers (one pooled aiohttp session). Transport failures become typed gateway errors
here, at the boundary.

Each timeout is enforced by exactly one mechanism and reports what it measured:
- connect: aiohttp's `connect` (a new connection to the worker);
- non-streamed answer: aiohttp's `total` (send to whole answer);
- a stream's first token: from sending the request to its first event (headers included);
- a stream's next token: the gap between two reads.
The two stream deadlines are one lazily re-armed timer per stream (`StreamWatch`), so a read costs
a clock read, not a timer (aiohttp's `sock_read` would fire on the idle limit while the worker is
still allowed to think about its first token).
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from service.errors import (
    GatewayError,
    NotServedByWorker,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.ops.settings import Settings
from service.workers.pool import Worker

JSON_HEADERS = {"Content-Type": "application/json"}
# A pooled connection the worker closed as we reused it: nothing was processed, so the request
# may go again, even to the same worker.
STALE_ERRNOS = {errno.ECONNRESET, errno.EPIPE}


def build_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled session for all workers. No cap on connections: the gateway's own slots bound
    them (a common default of 100 would silently cap concurrent streams). Idle connections are
    dropped before the worker drops them (vLLM's server closes idle ones after 5 s)."""
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=settings.upstream_keep_alive
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def translate(exc: BaseException, worker: Worker, connect_timeout: float) -> GatewayError:
    """A transport failure as the gateway error a client gets (and whether to try elsewhere)."""
    name = f"The worker for model '{worker.model}'"
    # Not reachable at all: the gateway ejects the worker until a health check brings it back.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"{name} did not accept a connection within {connect_timeout:g} s.",
                               retryable=True, eject=True)  # fmt: skip
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"{name} is unreachable.", retryable=True, eject=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and exc.errno in STALE_ERRNOS
    ):
        return UpstreamUnavailable(f"{name} closed the connection before answering.", retryable=True,
                                   stale=True)  # fmt: skip
    return UpstreamUnavailable(f"{name} failed: {type(exc).__name__}.")


def rejection(status: int, body: bytes, worker: Worker, path: str) -> GatewayError:
    """A non-200 answer: a worker's 4xx keeps its own error; anything else is the worker failing."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if 400 <= status < 500 and isinstance(parsed, dict) and "error" in parsed:
        return UpstreamRejected(status, parsed)
    if status in (404, 405):
        return NotServedByWorker(worker.model, path)
    if 400 <= status < 500 and isinstance(parsed, dict):
        return UpstreamRejected(status, parsed)
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' answered HTTP {status}.", retryable=status >= 500
    )


class StreamWatch:
    """Ends one upstream stream from outside its reader: when its first-token or next-token
    deadline passes, or when the drain ends it. Closing the response wakes the reader, which then
    raises `reason`.

    One timer per stream, re-armed lazily: a read only records the time (`touch`); when the timer
    fires it checks whether the stream was really idle that long, and if not, re-arms for the rest.
    """

    def __init__(self, worker: Worker, first_timeout: float, idle_timeout: float) -> None:
        self.worker = worker
        self.first_timeout = first_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.opened = self.loop.time()
        self.last = self.opened
        self.interval = first_timeout
        self.started = False  # the first event has arrived
        self.reason: GatewayError | None = None
        self.response: aiohttp.ClientResponse | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def first_deadline(self) -> float:
        """Loop time by which the first event must have arrived."""
        return self.opened + self.first_timeout

    def attach(self, response: aiohttp.ClientResponse) -> None:
        """The response is open (headers in): from now on the timer closes it."""
        self.response = response
        self._arm(self.first_deadline)

    def touch(self) -> None:
        """Bytes arrived."""
        self.last = self.loop.time()

    def first_event_seen(self) -> None:
        """From now on the limit is the gap between reads."""
        self.started = True
        self.interval = self.idle_timeout
        self.touch()
        self._arm(self.last + self.interval)

    def end(self, reason: GatewayError) -> None:
        """Stop the stream now; its reader raises `reason`."""
        if self.reason is None:
            self.reason = reason
        self.cancel()
        if self.response is not None:
            self.response.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def timeout_error(self) -> UpstreamTimeout:
        waited, seconds = (
            ("next token", self.idle_timeout) if self.started else ("first token", self.first_timeout)
        )
        return UpstreamTimeout(
            f"The worker for model '{self.worker.model}' sent no {waited} within {seconds:g} s."
        )

    def _arm(self, when: float) -> None:
        self.cancel()
        self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        due = self.last + self.interval
        if self.loop.time() >= due - 0.001:
            self.end(self.timeout_error())
        else:
            self._arm(due)


class UpstreamClient:
    """Sends requests to a worker and checks what comes back."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self._answer_timeout = aiohttp.ClientTimeout(
            total=settings.read_timeout, connect=settings.connect_timeout
        )
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)

    async def complete(self, worker: Worker, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed request; returns the parsed answer (a JSON object)."""
        try:
            async with self.session.post(
                worker.url + path, data=json.dumps(body).encode(), headers=JSON_HEADERS,
                timeout=self._answer_timeout,
            ) as response:  # fmt: skip
                content = await response.read()
                status = response.status
        except aiohttp.ConnectionTimeoutError as exc:
            raise translate(exc, worker, self.settings.connect_timeout) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The worker for model '{worker.model}' did not answer within "
                f"{self.settings.read_timeout:g} s."
            ) from exc
        except aiohttp.ClientError as exc:
            raise translate(exc, worker, self.settings.connect_timeout) from exc
        if status != 200:
            raise rejection(status, content, worker, path)
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent malformed JSON.") from exc
        if not isinstance(data, dict):
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent an unexpected answer.")
        return data

    async def open_stream(self, worker: Worker, path: str, body: dict[str, Any]) -> StreamWatch:
        """Start a streamed request; errors before its first byte raise here. The watch returned
        holds the open response and its deadlines."""
        settings = self.settings
        watch = StreamWatch(worker, settings.first_token_timeout, settings.idle_token_timeout)
        try:
            async with asyncio.timeout_at(watch.first_deadline):
                response = await self.session.post(
                    worker.url + path, data=json.dumps(body).encode(), headers=JSON_HEADERS,
                    timeout=self._stream_timeout,
                )  # fmt: skip
        except aiohttp.ConnectionTimeoutError as exc:
            raise translate(exc, worker, settings.connect_timeout) from exc
        except TimeoutError as exc:
            raise watch.timeout_error() from exc
        except aiohttp.ClientError as exc:
            raise translate(exc, worker, settings.connect_timeout) from exc
        if response.status != 200:
            try:
                content = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                response.release()
            raise rejection(response.status, content, worker, path)
        watch.attach(response)
        return watch


async def close_stream(watch: StreamWatch) -> None:
    """Done with a stream: a finished one returns its connection to the pool; an unfinished one
    closes it, which is how the worker learns to abort the generation."""
    watch.cancel()
    response = watch.response
    if response is None:
        return
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def iter_sse_blocks(
    watch: StreamWatch, connect_timeout: float, ends_with_done: bool = True
) -> AsyncIterator[bytes]:
    """A worker's event stream as blocks of whole events, as the bytes arrive (one read may carry
    many events when the worker is faster than the client; nothing is split per line here).

    For a stream that ends with `[DONE]`, ending before the consumer stopped there is an error;
    otherwise the worker's clean end of the response ends it. If the watch ended the stream (a
    deadline, the drain), its reason is raised.
    """
    response = watch.response
    assert response is not None
    content = response.content
    pending = b""
    first = True
    try:
        while True:
            chunk = await content.readany()
            if not chunk:
                if watch.reason is not None:
                    raise watch.reason
                if not content.at_eof():
                    continue
                if not ends_with_done:
                    if pending.strip():
                        yield pending + b"\n\n"
                    return
                raise UpstreamUnavailable(
                    f"The worker for model '{watch.worker.model}' ended the stream early."
                )
            watch.touch()
            data = pending + chunk if pending else chunk
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")  # CRLF line ends: same events
            end = data.rfind(b"\n\n") + 2
            if end < 2:
                pending = data  # no whole event yet
                continue
            pending = data[end:]
            if first:
                first = False
                watch.first_event_seen()
            yield data[:end] if pending else data
    except aiohttp.ClientError as exc:
        if watch.reason is not None:
            raise watch.reason from exc
        raise translate(exc, watch.worker, connect_timeout) from exc


def sse_payloads(block: bytes) -> list[bytes]:
    """The `data:` payloads of a block of whole events, in order (`[DONE]` included)."""
    return [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
