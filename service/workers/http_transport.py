"""The transport over HTTP: one pooled aiohttp session for all workers. Transport failures become
typed gateway errors here, at the boundary."""

from __future__ import annotations

import contextlib
import errno
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

from service.errors import (
    GatewayError,
    NotServedByWorker,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    WorkerAuthFailed,
)
from service.ops.settings import Settings
from service.workers.answer import Answer, looks_like_object
from service.workers.transport import Body, OversizedEvent, SseFramer, encode
from service.workers.worker import Worker

# aiohttp asks for gzip by default, and the gateway passes answers on as they came: a compressing
# ingress in front of a worker would hand clients compressed bytes. Ask for them as they are.
JSON_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
MAX_ERROR_BYTES = 1 << 20  # a worker's error answer is read (and parsed) up to this size
MAX_ERROR_MESSAGE = 4096  # bytes of a cut error's message decoded (the error exit clips it further)
_MESSAGE = re.compile(rb'"message"\s*:\s*"((?:[^"\\]|\\.){0,%d})' % MAX_ERROR_MESSAGE)
_PARAM = re.compile(rb'"param"\s*:\s*"([A-Za-z0-9_.\[\]]{1,200})"')
_PARAMETER = re.compile(rb"\(parameter=([A-Za-z0-9_.]{1,200}),")  # how vLLM names the field in a message
# A pooled connection the worker closed as we reused it: nothing was processed, so the request
# may go again, even to the same worker.
STALE_ERRNOS = {errno.ECONNRESET, errno.EPIPE}
AUTH_REFUSALS = (401, 403)  # a worker (or what stands before it) refusing the workers' key


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
    # A deadline counts wall time, and a stalled or starved gateway loop spends it too: no verdict on
    # the worker (the health check, which counts only the loop's own running time, gives it).
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"{name} did not accept a connection within {connect_timeout:g} s.",
                               retryable=True)  # fmt: skip
    # Refused or unroutable: not reachable at all, ejected until a health check brings it back.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"{name} is unreachable.", retryable=True, eject=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and exc.errno in STALE_ERRNOS
    ):
        return UpstreamUnavailable(f"{name} closed the connection before answering.", retryable=True,
                                   stale=True)  # fmt: skip
    return UpstreamUnavailable(f"{name} failed: {type(exc).__name__}.")


def rejection(status: int, body: bytes, worker: Worker, path: str, whole: bool = True) -> GatewayError:
    """A non-200 answer: a worker's 4xx keeps its status and its own error (also when the answer
    was over MAX_ERROR_BYTES and only its start was read); anything else is the worker failing. A
    401 or 403 is the worker refusing the gateway's own key: the client's request is not at fault."""
    if status in AUTH_REFUSALS:
        return WorkerAuthFailed(worker.model, status)
    if not whole:
        if 400 <= status < 500:
            return UpstreamRejected(status, {"error": _clipped_error(body, worker)})
        body = b""
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


def _clipped_error(start: bytes, worker: Worker) -> dict[str, Any]:
    """The error object of an answer of which only the start was read: its message (as much as
    that start holds) and param when they are in it (vLLM writes the message first)."""
    found = _MESSAGE.search(start)
    message = _json_string(found.group(1)) if found else None
    if message is None:
        message = (
            f"The worker for model '{worker.model}' refused the request (its error was too long to pass on)."
        )
    param = _PARAM.search(start) or _PARAMETER.search(message.encode())
    return {"message": message, "param": param.group(1).decode() if param else None}


def _json_string(raw: bytes) -> str | None:
    """A JSON string's content that may be cut anywhere (in an escape, in a UTF-8 sequence)."""
    text = raw.decode("utf-8", "ignore")
    for cut in range(min(6, len(text)) + 1):  # an escape cut short is at most 6 characters
        try:
            value = json.loads(f'"{text[: len(text) - cut]}"')
        except ValueError:
            continue
        if not isinstance(value, str):
            return None
        return value[:-1] if value and "\ud800" <= value[-1] <= "\udbff" else value  # half a pair
    return None


def answer_too_large(worker: Worker, limit: int, what: str = "answer") -> UpstreamUnavailable:
    """The 502 for a worker answer over the gateway's cap: what it was, and what to ask for less of."""
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' sent an {what} over this gateway's limit of {limit:,} bytes "
        "(GATEWAY_MAX_ANSWER_BYTES). Ask for less per request: fewer prompts or conversations, a smaller n, "
        "fewer logprobs or prompt logprobs, or fewer tokens; or stream the answer."
    )


def compressed(response: aiohttp.ClientResponse, worker: Worker) -> UpstreamUnavailable | None:
    """The 502 for an answer compressed in spite of `Accept-Encoding: identity`, else None."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    return UpstreamUnavailable(
        f"The worker for model '{worker.model}' answered with Content-Encoding {encoding!r} although the "
        "gateway asks for identity; whatever sits in front of the worker must not compress its answers."
    )


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytearray | None:
    """The whole body, or None as soon as it is over `limit` (from Content-Length when the worker
    declares it, else by counting). One buffer, sized up front when the length is declared."""
    declared = response.content_length
    if declared is not None and declared > limit:
        return None
    body = bytearray(declared) if declared is not None else bytearray()
    size = 0
    async for chunk in response.content.iter_any():
        end = size + len(chunk)
        if end > limit:
            return None
        if declared is not None and end <= declared:
            body[size:end] = chunk  # fills the buffer sized up front, no growth
        else:
            body += chunk
        size = end
    if declared is not None and size < declared:
        del body[size:]
    return body


async def read_error(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """A non-200 answer's body up to MAX_ERROR_BYTES, and whether that was all of it (if not, the
    connection is dropped with the rest unread)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk[: MAX_ERROR_BYTES - len(body)]
        if len(body) >= MAX_ERROR_BYTES:
            response.close()
            return bytes(body), False
    return bytes(body), True


class HttpStream:
    """An open streamed response (see `transport.UpstreamStream`)."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        worker: Worker,
        connect_timeout: float,
        ends_with_done: bool,
        max_event_bytes: int,
    ) -> None:
        self.response = response
        self.worker = worker
        self.connect_timeout = connect_timeout
        self.ends_with_done = ends_with_done
        self.max_event_bytes = max_event_bytes
        self.reason: GatewayError | None = None

    async def blocks(self) -> AsyncIterator[bytes]:
        """For a stream that ends with `[DONE]`, ending before the reader stopped there is an error;
        otherwise the worker's clean end of the response ends it."""
        content = self.response.content
        framer = SseFramer(self.max_event_bytes)
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
        except OversizedEvent as exc:
            raise answer_too_large(self.worker, self.max_event_bytes, "event") from exc

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
        self.max_answer_bytes = settings.max_answer_bytes
        self._answer_timeout = aiohttp.ClientTimeout(
            total=settings.read_timeout, connect=settings.connect_timeout
        )
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.health_timeout)

    async def complete(
        self, worker: Worker, path: str, body: Body, headers: dict[str, str] | None = None
    ) -> Answer:
        with self._whole_answer_errors(worker):
            async with self.session.post(
                worker.url + path, data=encode(body), timeout=self._answer_timeout, headers=headers
            ) as response:
                status = response.status
                if status != 200:
                    error, whole = await read_error(response)
                    raise rejection(status, error, worker, path, whole)
                content = await read_capped(response, self.max_answer_bytes)
                if content is None:
                    response.close()  # drop the rest unread
                problem = compressed(response, worker)
        if content is None:
            raise answer_too_large(worker, self.max_answer_bytes)
        if problem is not None:
            raise problem
        if not looks_like_object(content):
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' sent malformed JSON.")
        return Answer.of(content)

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
                content, whole = await read_error(response)
            except (TimeoutError, aiohttp.ClientError):
                content, whole = b"", True
            finally:
                response.release()
            raise rejection(response.status, content, worker, path, whole)
        if (problem := compressed(response, worker)) is not None:
            response.close()
            raise problem
        return HttpStream(response, worker, self.connect_timeout, ends_with_done, self.max_answer_bytes)

    async def health(self, worker: Worker) -> bool:
        async with self.session.get(f"{worker.url}/health", timeout=self._probe_timeout) as response:
            return response.status == 200

    async def post(self, worker: Worker, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        with self._whole_answer_errors(worker, f" {path}"):
            async with self.session.post(
                worker.url + path, data=encode(body), timeout=self._answer_timeout
            ) as response:
                return response.status, bytes(await read_capped(response, MAX_ERROR_BYTES) or b"")

    @contextlib.contextmanager
    def _whole_answer_errors(self, worker: Worker, what: str = "") -> Iterator[None]:
        """aiohttp's failures while waiting for a whole answer, as the gateway's own errors."""
        try:
            yield
        except aiohttp.ConnectionTimeoutError as exc:
            raise translate(exc, worker, self.connect_timeout) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The worker for model '{worker.model}' did not answer{what} within {self.read_timeout:g} s."
            ) from exc
        except aiohttp.ClientError as exc:
            raise translate(exc, worker, self.connect_timeout) from exc

    async def get_json(self, worker: Worker, path: str) -> Any:
        async with self.session.get(worker.url + path, timeout=self._probe_timeout) as response:
            _check_status(response.status, worker, path)
            return await response.json(content_type=None)

    async def get_text(self, worker: Worker, path: str) -> str:
        async with self.session.get(worker.url + path, timeout=self._probe_timeout) as response:
            _check_status(response.status, worker, path)
            return await response.text()


def _check_status(status: int, worker: Worker, path: str) -> None:
    """A GET's answer must be 200: a refused key is `WorkerAuthFailed`, anything else a ValueError."""
    if status in AUTH_REFUSALS:
        raise WorkerAuthFailed(worker.model, status)
    if status != 200:
        raise ValueError(f"GET {path} answered {status}")
