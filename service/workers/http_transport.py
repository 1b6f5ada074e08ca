"""The transport over HTTP: one pooled aiohttp session for all workers. Transport failures become
typed gateway errors here, at the boundary."""

from __future__ import annotations

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
from service.workers.transport import Answer, Body, SseFramer, encode
from service.workers.worker import Worker

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
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, headers=worker_headers(settings)
    )


def worker_headers(settings: Settings) -> dict[str, str]:
    """Headers of every request to a worker, probes included: JSON, and the workers' own key if set."""
    token = settings.worker_api_key  # vLLM's --api-key: guards the worker's /v1 routes
    return {**JSON_HEADERS, "Authorization": f"Bearer {token.get_secret_value()}"} if token else JSON_HEADERS


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


class HttpStream:
    """An open streamed response (see `transport.UpstreamStream`)."""

    def __init__(
        self, response: aiohttp.ClientResponse, worker: Worker, connect_timeout: float, ends_with_done: bool
    ) -> None:
        self.response = response
        self.worker = worker
        self.connect_timeout = connect_timeout
        self.ends_with_done = ends_with_done
        self.reason: GatewayError | None = None

    async def blocks(self) -> AsyncIterator[bytes]:
        """For a stream that ends with `[DONE]`, ending before the reader stopped there is an error;
        otherwise the worker's clean end of the response ends it."""
        content = self.response.content
        framer = SseFramer()
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    if self.reason is not None:
                        raise self.reason
                    if not content.at_eof():
                        continue
                    if not self.ends_with_done:
                        if rest := framer.rest():
                            yield rest
                        return
                    raise UpstreamUnavailable(
                        f"The worker for model '{self.worker.model}' ended the stream early."
                    )
                if block := framer.feed(chunk):
                    yield block
        except aiohttp.ClientError as exc:
            if self.reason is not None:
                raise self.reason from exc
            raise translate(exc, self.worker, self.connect_timeout) from exc

    def end(self, reason: GatewayError) -> None:
        if self.reason is None:
            self.reason = reason
        self.response.close()  # wakes the reader

    async def close(self) -> None:
        """A finished stream returns its connection to the pool; an unfinished one closes it, which
        is how the worker learns to abort the generation."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


class HttpTransport:
    """`transport.Transport` over one pooled aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self.session = session
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self._answer_timeout = aiohttp.ClientTimeout(
            total=settings.read_timeout, connect=settings.connect_timeout
        )
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.health_timeout)

    async def complete(
        self, worker: Worker, path: str, body: Body, headers: dict[str, str] | None = None
    ) -> Answer:
        try:
            async with self.session.post(
                worker.url + path, data=encode(body), timeout=self._answer_timeout, headers=headers
            ) as response:
                content = await response.read()
                status = response.status
        except aiohttp.ConnectionTimeoutError as exc:
            raise translate(exc, worker, self.connect_timeout) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The worker for model '{worker.model}' did not answer within {self.read_timeout:g} s."
            ) from exc
        except aiohttp.ClientError as exc:
            raise translate(exc, worker, self.connect_timeout) from exc
        if status != 200:
            raise rejection(status, content, worker, path)
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent malformed JSON.") from exc
        if not isinstance(data, dict):
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent an unexpected answer.")
        return Answer(data, content)

    async def stream(
        self,
        worker: Worker,
        path: str,
        body: Body,
        ends_with_done: bool,
        headers: dict[str, str] | None = None,
    ) -> HttpStream:
        try:
            response = await self.session.post(
                worker.url + path,
                data=encode(body),
                timeout=self._stream_timeout,
                headers=headers,
            )
        except aiohttp.ClientError as exc:  # its connect timeout included
            raise translate(exc, worker, self.connect_timeout) from exc
        if response.status != 200:
            try:
                content = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                response.release()
            raise rejection(response.status, content, worker, path)
        return HttpStream(response, worker, self.connect_timeout, ends_with_done)

    async def health(self, worker: Worker) -> bool:
        async with self.session.get(f"{worker.url}/health", timeout=self._probe_timeout) as response:
            return response.status == 200

    async def get_json(self, worker: Worker, path: str) -> Any:
        async with self.session.get(worker.url + path, timeout=self._probe_timeout) as response:
            if response.status != 200:
                raise ValueError(f"GET {path} answered {response.status}")
            return await response.json(content_type=None)

    async def get_text(self, worker: Worker, path: str) -> str:
        async with self.session.get(worker.url + path, timeout=self._probe_timeout) as response:
            if response.status != 200:
                raise ValueError(f"GET {path} answered {response.status}")
            return await response.text()
