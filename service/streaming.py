"""Relaying a worker's event stream to the client: translation, token timing, usage, and
cleanup that happens exactly once however the stream ends."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import GatewayError, UpstreamRejected, error_body
from service.observe import RequestRecord
from service.pool import Worker
from service.translate import StreamTranslator

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Relay:
    """Turns worker payloads into client events. With no translator the worker's events pass
    through untouched, except its usage-only event, which is forwarded only if asked for."""

    def __init__(
        self,
        worker: Worker,
        record: RequestRecord,
        translator: StreamTranslator | None,
        forward_usage: bool = True,
    ) -> None:
        self.worker = worker
        self.record = record
        self.translator = translator
        self.forward_usage = forward_usage
        self.completed = False

    async def events(self, payloads: AsyncIterator[str]) -> AsyncIterator[bytes]:
        """Client events for the worker's payloads, always ending with `[DONE]`."""
        try:
            async for payload in payloads:
                for event in self._on_payload(payload):
                    yield event
            if self.translator is not None:
                for closing in self.translator.finish():
                    yield sse_event(closing)
        except GatewayError as exc:
            log.warning("stream from worker %s broke: %s", self.worker.label, exc.message)
            self.record.failed(exc.error_type)
            yield sse_event(exc.envelope())
        except ValueError:
            log.warning("worker %s sent a malformed stream event", self.worker.label)
            self.record.failed("upstream_error")
            yield sse_event(error_body("The model worker sent a malformed event.", "upstream_error"))
        yield DONE_EVENT
        self.completed = True

    def _on_payload(self, payload: str) -> list[bytes]:
        if self.translator is None and '"usage"' not in payload and '"error"' not in payload:
            self.record.token_sent()  # the common case: a token event, passed through unparsed
            return [b"data: " + payload.encode() + b"\n\n"]
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError("event is not an object")
        if "error" in chunk:
            raise UpstreamRejected(502, chunk)  # the worker's own error object, passed on
        self.record.set_usage(chunk.get("usage"))
        choices = chunk.get("choices") or []
        if any(choice.get("text") for choice in choices):
            self.record.token_sent()
        if self.translator is not None:
            return [sse_event(event) for event in self.translator.on_chunk(chunk)]
        if choices or self.forward_usage:
            return [b"data: " + payload.encode() + b"\n\n"]
        return []


class RelayResponse(StreamingResponse):
    """An event stream whose upstream side is closed exactly once, however the client leaves
    (even before the first byte), so the worker aborts the generation and the slot is freed."""

    def __init__(
        self, relay: Relay, payloads: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(relay.events(payloads), media_type="text/event-stream", headers=SSE_HEADERS)
        self._relay = relay
        self._on_close = on_close
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._closed:
                self._closed = True
                if not self._relay.completed:
                    self._relay.record.disconnected = True
                await self._on_close()
