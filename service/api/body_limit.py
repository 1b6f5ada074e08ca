"""The body's size limit, before anything parses it (chunked bodies too); its deadline is the HTTP
protocol's (see http_protocol.py). A refusal is a typed error answered through `errors.reject`."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import reject
from service.errors import RequestTooLarge

DISCARD_FACTOR = 16  # how much of an oversized body is read and dropped before answering 413
WHOLE, GONE, OVER, OVER_MORE_COMING = "whole", "gone", "over", "over, more coming"


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
        outcome = await self._read(receive, chunks)
        if outcome == GONE:
            return
        if outcome != WHOLE:
            await self._too_large(scope, receive, send, more_body=outcome == OVER_MORE_COMING)
            return
        body = b"".join(chunks)
        scope.setdefault("state", {})["body"] = body  # the dispatcher takes it from here
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive, chunks: list[bytes]) -> str:
        """Read the body into `chunks`; says how that went."""
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return GONE
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > self.max_bytes:
                return OVER_MORE_COMING if more else OVER
            chunks.append(chunk)
            if not more:
                return WHOLE

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
        await reject(scope, receive, send, RequestTooLarge(self.max_bytes))
