"""An in-memory `Transport` (in the style of httpx's `MockTransport`): scripted answers per worker, no
sockets, so the gateway's failover, deadlines, drain and relay run in unit tests.

    fake = FakeTransport()
    fake.reply(worker_a, UpstreamUnavailable("down", retryable=True))   # the first request to a fails
    fake.reply(worker_b, {"choices": [...]})                          # ...and b answers
    fake.reply(worker_b, FakeStream([b"data: {...}\\n\\n", 0.5, b"data: [DONE]\\n\\n"]))

A worker's replies are used in order; the last one repeats. What was sent is in `fake.sent`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service.errors import GatewayError, UpstreamUnavailable
from service.workers.answer import Answer
from service.workers.transport import Body
from service.workers.worker import Worker

# A stream item: bytes to deliver, seconds to wait, or an error to raise there.
StreamItem = bytes | float | GatewayError


@dataclass
class FakeStream:
    """A scripted stream; its `closed` and `aborted` say how the gateway left it."""

    items: list[StreamItem]
    worker: Worker = field(init=False)
    ends_with_done: bool = True
    reason: GatewayError | None = None
    finished: bool = False
    closed: bool = False
    aborted: bool = False

    def __post_init__(self) -> None:
        self._ended = asyncio.Event()

    async def blocks(self) -> AsyncIterator[bytes]:
        for item in self.items:
            if isinstance(item, GatewayError):
                raise item
            if isinstance(item, float | int):
                try:
                    await asyncio.wait_for(self._ended.wait(), timeout=float(item))
                except TimeoutError:
                    continue
            if self.reason is not None:
                raise self.reason
            if isinstance(item, bytes):
                self.finished = b"[DONE]" in item  # the worker has said all it will
                yield item
        self.finished = True
        if self.ends_with_done and not any(isinstance(i, bytes) and b"[DONE]" in i for i in self.items):
            raise UpstreamUnavailable(f"The worker for model '{self.worker.model}' ended the stream early.")

    def end(self, reason: GatewayError) -> None:
        self.reason = self.reason or reason
        self._ended.set()

    async def close(self) -> None:
        self.closed = True
        self.aborted = not self.finished


Reply = dict[str, Any] | bytes | GatewayError | FakeStream  # bytes: a whole answer as sent


class FakeTransport:
    """`transport.Transport` answering from scripts."""

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.healthy: dict[str, bool] = {}
        self.facts: dict[tuple[str, str], Any] = {}
        self.sent: list[tuple[str, str, dict[str, Any]]] = []  # (worker name, path, body)
        self.headers: list[dict[str, str]] = []  # the extra headers of each request
        # `post` answers: (worker url, path) -> a callable of the body giving (status, JSON or text)
        self.posts: dict[tuple[str, str], Any] = {}

    def reply(self, worker: Worker, *replies: Reply) -> None:
        self.replies.setdefault(worker.url, []).extend(replies)

    def _next(self, worker: Worker, path: str, body: Body) -> Reply:
        self.sent.append((worker.name, path, body if isinstance(body, dict) else json.loads(body)))
        queue = self.replies.get(worker.url)
        if not queue:
            raise UpstreamUnavailable(
                f"The worker for model '{worker.model}' is unreachable.", retryable=True
            )
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, GatewayError):
            raise reply
        return reply

    async def complete(
        self, worker: Worker, path: str, body: Body, headers: dict[str, str] | None = None
    ) -> Answer:
        self.headers.append(headers or {})
        reply = self._next(worker, path, body)
        if isinstance(reply, FakeStream):
            raise TypeError("a non-streamed request was scripted a stream")
        return Answer.of(reply if isinstance(reply, bytes) else json.dumps(reply).encode())

    async def stream(
        self,
        worker: Worker,
        path: str,
        body: Body,
        ends_with_done: bool,
        headers: dict[str, str] | None = None,
    ) -> FakeStream:
        self.headers.append(headers or {})
        reply = self._next(worker, path, body)
        if not isinstance(reply, FakeStream):
            raise TypeError("a streamed request was scripted an answer")
        reply.worker, reply.ends_with_done = worker, ends_with_done
        return reply

    async def health(self, worker: Worker) -> bool:
        return self.healthy.get(worker.url, True)

    async def post(self, worker: Worker, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        self.sent.append((worker.name, path, body))
        answer = self.posts.get((worker.url, path))
        if answer is None:
            raise UpstreamUnavailable(f"The worker for model '{worker.model}' is unreachable.")
        status, content = await answer(body) if asyncio.iscoroutinefunction(answer) else answer(body)
        return status, content.encode() if isinstance(content, str) else json.dumps(content).encode()

    async def get_json(self, worker: Worker, path: str) -> Any:
        found = self.facts.get((worker.url, path))
        if callable(found):  # a worker whose answer changes (its adapters, say)
            found = found()
        if found is None:
            raise ValueError(f"GET {path}: nothing scripted")
        return found

    async def get_text(self, worker: Worker, path: str) -> str:
        found = self.facts.get((worker.url, path))
        if not isinstance(found, str):
            raise ValueError(f"GET {path}: nothing scripted")
        return found
