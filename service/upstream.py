"""HTTP to workers. Transport failures become typed gateway errors here, at the boundary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from service.drain import ShuttingDown, StreamWatch
from service.errors import GatewayError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from service.pool import Worker
from service.settings import Settings

COMPLETIONS_PATH = "/v1/completions"


def build_client(settings: Settings) -> httpx.AsyncClient:
    """One pooled client for all workers, sized for many concurrent long streams."""
    timeout = httpx.Timeout(
        connect=settings.connect_timeout, read=settings.read_timeout, write=30.0, pool=30.0
    )
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256, keepalive_expiry=30.0)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def _translate(exc: httpx.HTTPError, worker: Worker) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(f"The worker for model '{worker.model}' did not answer in time.")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        # The request never reached the worker: safe to send elsewhere.
        # Passive ejection: the next health check brings it back when it answers again.
        worker.healthy = False
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' failed: {type(exc).__name__}.",
        retryable=isinstance(exc, httpx.TransportError),
    )


def _rejection(response: httpx.Response, body: bytes, worker: Worker) -> GatewayError:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if 400 <= response.status_code < 500 and isinstance(parsed, dict):
        return UpstreamRejected(response.status_code, parsed)
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' answered HTTP {response.status_code}.",
        retryable=response.status_code >= 500,
    )


class UpstreamClient:
    """Sends completion requests to a worker and checks what comes back."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def complete(self, worker: Worker, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streamed /v1/completions; returns the parsed answer."""
        try:
            response = await self.client.post(worker.url + COMPLETIONS_PATH, json=body)
        except httpx.HTTPError as exc:
            raise _translate(exc, worker) from exc
        if response.status_code != 200:
            raise _rejection(response, response.content, worker)
        try:
            data = response.json()
        except ValueError as exc:
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent malformed JSON.") from exc
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent an unexpected answer.")
        return data

    async def open_stream(self, worker: Worker, body: dict[str, Any]) -> httpx.Response:
        """Start a streamed /v1/completions; errors before the first byte raise here."""
        request = self.client.build_request("POST", worker.url + COMPLETIONS_PATH, json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc, worker) from exc
        if response.status_code != 200:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            raise _rejection(response, content, worker)
        return response


async def iter_sse_data(
    response: httpx.Response,
    worker: Worker,
    first_timeout: float,
    idle_timeout: float,
    watch: StreamWatch | None = None,
) -> AsyncIterator[str]:
    """The `data:` payloads of a worker's event stream, up to (not including) `[DONE]`.

    The first payload must come within `first_timeout` seconds, each next one within `idle_timeout`.
    A `watch` lets a graceful drain end the stream early.
    """
    lines = response.aiter_lines()
    first = True
    try:
        while True:
            if watch is not None and watch.ending:
                raise ShuttingDown(watch.ending)
            timeout = first_timeout if first else idle_timeout
            try:
                async with asyncio.timeout(timeout) as pending:
                    if watch is not None:
                        watch.timeout = pending
                    line = await anext(lines)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                if watch is not None and watch.ending:
                    raise ShuttingDown(watch.ending) from exc
                waited = "first token" if first else "next token"
                raise UpstreamTimeout(
                    f"The worker for model '{worker.model}' sent no {waited} within {timeout:g} s."
                ) from exc
            finally:
                if watch is not None:
                    watch.timeout = None
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            first = False
            yield payload
    except httpx.HTTPError as exc:
        raise _translate(exc, worker) from exc
