"""HTTP to workers (one pooled aiohttp session). Transport failures become typed gateway errors
here, at the boundary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from service.drain import ShuttingDown, StreamWatch
from service.errors import GatewayError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from service.pool import Worker
from service.settings import Settings

COMPLETIONS_PATH = "/v1/completions"
JSON_HEADERS = {"Content-Type": "application/json"}


def build_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled session for all workers. No cap on connections: the gateway's own slots bound
    them (a common default of 100 would silently cap concurrent streams)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def _translate(exc: BaseException, worker: Worker) -> GatewayError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        # The request never reached the worker: eject it (the next good health check brings it
        # back) and let another replica take the request.
        worker.healthy = False
        return UpstreamUnavailable(f"The worker for model '{worker.model}' is unreachable.", retryable=True)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"The worker for model '{worker.model}' did not answer in time.")
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' failed: {type(exc).__name__}.",
        retryable=isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError),
    )


def _rejection(status: int, body: bytes, worker: Worker) -> GatewayError:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if 400 <= status < 500 and isinstance(parsed, dict):
        return UpstreamRejected(status, parsed)
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' answered HTTP {status}.",
        retryable=status >= 500,
    )


class UpstreamClient:
    """Sends completion requests to a worker and checks what comes back."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def complete(self, worker: Worker, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streamed /v1/completions; returns the parsed answer."""
        try:
            async with self.session.post(
                worker.url + COMPLETIONS_PATH, data=json.dumps(body).encode(), headers=JSON_HEADERS
            ) as response:
                content = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc, worker) from exc
        if status != 200:
            raise _rejection(status, content, worker)
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent malformed JSON.") from exc
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent an unexpected answer.")
        return data

    async def open_stream(
        self, worker: Worker, body: dict[str, Any], idle_timeout: float
    ) -> aiohttp.ClientResponse:
        """Start a streamed /v1/completions; errors before the first byte raise here. Each read
        after that must bring bytes within `idle_timeout` (checked by the socket, not per event)."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.session.timeout.connect, sock_read=idle_timeout
        )
        try:
            response = await self.session.post(
                worker.url + COMPLETIONS_PATH,
                data=json.dumps(body).encode(),
                headers=JSON_HEADERS,
                timeout=timeout,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc, worker) from exc
        if response.status != 200:
            try:
                content = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                response.release()
            raise _rejection(response.status, content, worker)
        return response


async def close_stream(response: aiohttp.ClientResponse) -> None:
    """Done with a stream: a finished one returns its connection to the pool; an unfinished one
    closes it, which is how the worker learns to abort the generation."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def iter_sse_blocks(
    response: aiohttp.ClientResponse,
    worker: Worker,
    first_timeout: float,
    idle_timeout: float,
    watch: StreamWatch | None = None,
) -> AsyncIterator[bytes]:
    """A worker's event stream as blocks of whole events, as the bytes arrive (one read may carry
    many events when the worker is faster than the client; nothing is split per line here).

    The first block must come within `first_timeout` seconds; later, the socket's read timeout
    (`idle_timeout`, set by `open_stream`) guards the gaps, at no cost per event. Ending without
    the consumer having stopped (at `[DONE]`) is an error. A `watch` lets a graceful drain end the
    stream early (it closes the response).
    """
    content = response.content
    pending = b""
    first_deadline: float | None = asyncio.get_running_loop().time() + first_timeout
    try:
        while True:
            if first_deadline is not None:
                async with asyncio.timeout_at(first_deadline):
                    chunk = await content.readany()
            else:
                chunk = await content.readany()
            if not chunk:
                if watch is not None and watch.ending:
                    raise ShuttingDown(watch.ending)
                if not content.at_eof():
                    continue
                raise UpstreamUnavailable(f"The worker for model '{worker.model}' ended the stream early.")
            data = pending + chunk if pending else chunk
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")  # CRLF line ends: same events
            end = data.rfind(b"\n\n") + 2
            if end < 2:
                pending = data  # no whole event yet
                continue
            pending = data[end:]
            first_deadline = None
            yield data[:end] if pending else data
    except TimeoutError as exc:
        waited, seconds = ("first token", first_timeout) if first_deadline else ("next token", idle_timeout)
        raise UpstreamTimeout(
            f"The worker for model '{worker.model}' sent no {waited} within {seconds:g} s."
        ) from exc
    except aiohttp.ClientError as exc:
        if watch is not None and watch.ending:
            raise ShuttingDown(watch.ending) from exc
        raise _translate(exc, worker) from exc


def sse_payloads(block: bytes) -> list[bytes]:
    """The `data:` payloads of a block of whole events, in order (`[DONE]` included)."""
    return [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
