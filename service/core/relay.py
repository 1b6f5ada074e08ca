"""Relaying a worker's event stream to the client: translation, token timing, usage, and
cleanup that happens exactly once however the stream ends."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.core.translate import StreamTranslator
from service.errors import GatewayError, UpstreamRejected, UpstreamUnavailable
from service.ops.record import RequestRecord
from service.workers.transport import sse_payloads
from service.workers.worker import Worker

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"
MALFORMED_EVENT = UpstreamUnavailable("The model worker sent a malformed event.")


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# What makes a block of worker events need a closer look: a usage object (metrics; maybe dropped),
# an error object, or the end. A JSON string can't hold a raw `"` or newline, so generated text
# never matches these; `"usage":null` (vLLM's token events) does not match either. Each pattern
# starts with a literal, which `re` finds with a fast scan (one alternation of all three cost more
# per event than everything else the relay does; see bench/README.md).
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]+)"')
ERROR_KEY = re.compile(rb'"error"\s*:')
DONE_PAYLOAD = b"[DONE]"


def needs_parsing_at(block: bytes, finish: bool = False) -> int:
    """Where the first usage object, error key or `[DONE]` line (with `finish`, also a finish reason)
    starts in a block, or -1."""
    patterns = (USAGE_OBJECT, ERROR_KEY, FINISH_REASON) if finish else (USAGE_OBJECT, ERROR_KEY)
    found = [match.start() for pattern in patterns if (match := pattern.search(block))]
    done = block.find(DONE_PAYLOAD)
    while done >= 0:
        line_start = block.rfind(b"\n", 0, done) + 1
        if block[line_start:done].rstrip() == b"data:":
            found.append(line_start)
            break
        done = block.find(DONE_PAYLOAD, done + 1)
    return min(found, default=-1)


def count_events(block: bytes) -> int:
    """`data:` events in a block of whole events (a raw newline only ever starts a line)."""
    return block.count(b"\ndata:") + block.startswith(b"data:")


def split_plain(block: bytes, finish: bool = False) -> tuple[bytes, bytes]:
    """A block's leading events that pass as they are, and the rest: from the first event holding
    usage, an error or `[DONE]` (with `finish`, or a finish reason), empty when there is none."""
    found = needs_parsing_at(block, finish)
    if found < 0:
        return block, b""
    previous_end = block.rfind(b"\n\n", 0, found)
    cut = previous_end + 2 if previous_end >= 0 else 0
    return block[:cut], block[cut:]


@dataclass(frozen=True)
class StreamFormat:
    """How a kind of event stream ends, what in it is a token, and how an error is written into it."""

    name: str
    done_marker: bool  # ends with `data: [DONE]` (else: with the worker's clean end of stream)
    token_marker: bytes | None = None  # events holding this are tokens (None: every data event)

    def tokens_in(self, block: bytes) -> int:
        """Token events in a block of plain events (none of them holds usage, an error or the end)."""
        return count_events(block) if self.token_marker is None else block.count(self.token_marker)

    def is_token(self, event: bytes, chunk: dict[str, Any]) -> bool:
        """Whether one parsed event carries generated text (a usage-only event does not)."""
        return self.token_marker in event if self.token_marker is not None else bool(chunk.get("choices"))

    def error_event(self, envelope: dict[str, Any]) -> bytes:
        if self.done_marker:
            return sse_event(envelope)
        # The Responses API's own error event.
        error = envelope["error"]
        event = {"type": "error", "code": error.get("code") or error.get("type"), "message": error["message"],
                 "param": error.get("param")}  # fmt: skip
        return b"event: error\n" + sse_event(event)


OPENAI_STREAM = StreamFormat("openai", done_marker=True)
RESPONSES_STREAM = StreamFormat("responses", done_marker=False, token_marker=b'"response.output_text.delta"')


class Relay:
    """Turns worker events into client events. With no translator the worker's bytes pass through
    as they came, a whole read at a time; only events holding usage, an error or the end are parsed
    (a usage-only event is forwarded only if the client asked for usage)."""

    def __init__(
        self,
        worker: Worker,
        record: RequestRecord,
        translator: StreamTranslator | None,
        forward_usage: bool = True,
        fmt: StreamFormat = OPENAI_STREAM,
    ) -> None:
        self.worker = worker
        self.record = record
        self.translator = translator
        self.forward_usage = forward_usage
        self.fmt = fmt
        self.completed = False
        # When the client did not ask for usage, the gateway's usage event is dropped; vLLM, asked for
        # none, writes its `system_fingerprint` on each choice's last event instead: those are held
        # until the usage event, to carry its fingerprint as they would have.
        self.hold_last = translator is None and not forward_usage and fmt.done_marker
        self.held: list[bytes] = []

    async def events(self, blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Client events for the worker's blocks of events, ending as the stream format ends."""
        try:
            async with contextlib.aclosing(blocks):  # type: ignore[type-var]
                async for block in blocks:
                    if self.record.span is not None:  # traced: the span gets the finish reasons
                        self.record.finish_reasons += [r.decode() for r in FINISH_REASON.findall(block)]
                    if self.translator is None:
                        plain, block = split_plain(block, self.hold_last)
                        if plain:
                            self.record.tokens_sent(self.fmt.tokens_in(plain))
                            yield plain
                        if not block:
                            continue
                        out, done = self._pass_block(block)
                    else:
                        out, done = self._translate_block(block)
                    if out:
                        yield out
                    if done:
                        break
            if self.translator is not None:
                for closing in self.translator.finish():
                    yield sse_event(closing)
            if self.held:
                yield b"".join(self._release(None))
        except (GatewayError, ValueError) as exc:
            if self.held:
                yield b"".join(self._release(None))
            error = exc if isinstance(exc, GatewayError) else MALFORMED_EVENT
            log.warning("stream from worker %s broke: %s", self.worker.label, error.message)
            self.record.failed(error)  # after the first byte, the error is the stream's last event
            yield self.fmt.error_event(error.envelope())
        if self.fmt.done_marker:
            yield DONE_EVENT
        self.completed = True

    def _pass_block(self, block: bytes) -> tuple[bytes, bool]:
        """A block's events as they came (minus an unwanted usage-only event), and whether it held
        the worker's `[DONE]`."""
        out: list[bytes] = []
        for event in block.split(b"\n\n"):
            payloads = sse_payloads(event)
            if not payloads:
                continue
            if payloads[0] == b"[DONE]":
                return b"".join([*out, *self._release(None)]), True
            chunk = self._inspect(b"\n".join(payloads))
            if self.fmt.is_token(event, chunk):
                self.record.token_sent()
            if chunk.get("choices") == [] and chunk.get("usage") and not self.forward_usage:
                out += self._release(chunk.get("system_fingerprint"))
                continue  # the usage the gateway asked for, not the client
            if self.hold_last and any(c.get("finish_reason") for c in chunk.get("choices") or ()):
                self.held.append(event)
                continue
            out.append(event + b"\n\n")
        return b"".join(out), False

    def _release(self, fingerprint: str | None) -> list[bytes]:
        """The held last events, each with the worker's fingerprint where vLLM would have written it."""
        held, self.held = self.held, []
        if not fingerprint:
            return [event + b"\n\n" for event in held]
        out = []
        for event in held:
            chunk = json.loads(b"\n".join(sse_payloads(event)))
            chunk.setdefault("system_fingerprint", fingerprint)
            out.append(sse_event(chunk))
        return out

    def _translate_block(self, block: bytes) -> tuple[bytes, bool]:
        """A block's events in the translator's shape, and whether it held the worker's `[DONE]`."""
        assert self.translator is not None
        out: list[bytes] = []
        for payload in sse_payloads(block):
            if payload == b"[DONE]":
                return b"".join(out), True
            chunk = self._inspect(payload)
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                self.record.token_sent()
            out.extend(sse_event(event) for event in self.translator.on_chunk(chunk))
        return b"".join(out), False

    def _inspect(self, payload: bytes) -> dict[str, Any]:
        """One event's JSON: its usage is recorded; a worker's error object ends the stream."""
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError("event is not an object")
        if "error" in chunk and chunk["error"] is not None:
            raise UpstreamRejected(502, chunk)  # the worker's own error object, passed on
        if chunk.get("type") == "error":  # the Responses API's error event
            raise UpstreamRejected(502, {"error": chunk})
        usage = chunk.get("usage")
        if usage is None and isinstance(chunk.get("response"), dict):
            usage = chunk["response"].get("usage")  # the Responses API's final event
        self.record.set_usage(usage)
        return chunk


class RelayResponse(StreamingResponse):
    """An event stream whose upstream side is closed exactly once, however the client leaves
    (even before the first byte), so the worker aborts the generation and the slot is freed."""

    def __init__(
        self, relay: Relay, blocks: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(relay.events(blocks), media_type="text/event-stream", headers=SSE_HEADERS)
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
