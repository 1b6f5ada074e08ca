"""Pure ASGI guards in front of the routes: body size (before parsing, chunked bodies too) and
API keys (Bearer, constant-time) with an optional per-key rate limit."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

from limits import RateLimitItem, parse, storage, strategies
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body

# Open without a key: probes, and the playground page (it holds no secret; it asks for the key).
OPEN_PATHS = frozenset({"/health", "/ready", "/"})
OPEN_PREFIXES = ("/static/",)
DISCARD_FACTOR = 16  # how much of an oversized body is read and dropped before answering 413


async def _reject(
    scope: Scope, receive: Receive, send: Send, status: int, body: dict[str, Any], headers: dict[str, str]
) -> None:
    record = scope.get("state", {}).get("record")
    if record is not None:
        record.failed(body["error"]["type"])
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 before anything parses them.

    The body is read here (as FastAPI would) and replayed to the app; later `receive` calls go to
    the client, so disconnects are still seen.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, more_body=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, more_body=more)
                return
            chunks.append(chunk)
            if not more:
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, more_body: bool) -> None:
        # Read what the client is still sending (up to a bound) so that closing the connection
        # does not reset it before the client has read the 413.
        budget = DISCARD_FACTOR * self.max_bytes
        while more_body and budget > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            budget -= len(message.get("body", b""))
            more_body = bool(message.get("more_body", False))
        text = f"The request body is over the {self.max_bytes}-byte limit."
        body = error_body(text, "invalid_request_error", code="request_too_large")
        await _reject(scope, receive, send, 413, body, {"Connection": "close"})


class ApiKeyMiddleware:
    """With keys configured, every route but /health and /ready (and /metrics, if public) needs
    `Authorization: Bearer <key>`; each key may also be rate limited."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        open_paths: frozenset[str] = OPEN_PATHS,
        rate_limit: str | None = None,
    ) -> None:
        self.app = app
        # Compare digests so the comparison time says nothing about a key's length or prefix.
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.open_paths = open_paths
        self.limit: RateLimitItem | None = parse(rate_limit) if rate_limit else None
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def _key_index(self, scope: Scope) -> int | None:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for index, known in enumerate(self.digests):
            if hmac.compare_digest(digest, known):  # no early exit: every key is compared
                found = index
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        index = self._key_index(scope)
        if index is None:
            body = error_body(
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                "invalid_request_error",
                code="invalid_api_key",
            )
            await _reject(scope, receive, send, 401, body, {"WWW-Authenticate": "Bearer"})
            return
        if self.limit is not None and not self.limiter.hit(self.limit, str(index)):
            reset, _ = self.limiter.get_window_stats(self.limit, str(index))
            body = error_body(
                f"Rate limit of {self.limit} exceeded for this API key.", "rate_limit_error",
                code="rate_limit_exceeded",
            )  # fmt: skip
            retry_after = max(1, int(reset - time.time()) + 1)
            await _reject(scope, receive, send, 429, body, {"Retry-After": str(retry_after)})
            return
        await self.app(scope, receive, send)
