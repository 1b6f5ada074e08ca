"""The gateway's shared state and the steps every generation request goes through:
resolve the model, tokenize, fit the context, send to a worker, shape the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import ContextLengthExceeded, GatewayError, ModelNotFound, NotAChatModel, error_body
from service.pool import ModelPool, Worker
from service.settings import ModelKind, Settings
from service.templates import INLINE_TOKENIZE_CHARS, ModelTokenizer, RenderedPrompt
from service.translate import StreamTranslator
from service.upstream import UpstreamClient, iter_sse_data

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def fit_max_tokens(prompt_tokens: int, requested: int | None, context: int, cap: int) -> int:
    """Tokens to generate: the request's own if it fits, else the rest of the context up to `cap`."""
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"The prompt is {prompt_tokens} tokens but this model's context is {context} tokens; "
            "shorten the prompt.",
            param="prompt",
        )
    if requested is None:
        return min(context - prompt_tokens, cap)
    if prompt_tokens + requested > context:
        raise ContextLengthExceeded(
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) is "
            f"{prompt_tokens + requested} tokens, over this model's context of {context} tokens; "
            f"ask for at most {context - prompt_tokens} tokens.",
            param="max_tokens",
        )
    return requested


@dataclass
class Gateway:
    """What the routes share: settings, model pools, tokenizers and the upstream client."""

    settings: Settings
    pools: dict[str, ModelPool]
    tokenizers: dict[str, ModelTokenizer]
    upstream: UpstreamClient

    def resolve(self, name: str | None, default_kind: ModelKind) -> ModelPool:
        """The named model, or the first one of `default_kind`."""
        if name is None:
            pool = next((p for p in self.pools.values() if p.kind is default_kind), None)
            if pool is None:
                raise ModelNotFound(f"<default {default_kind.value} model>", list(self.pools))
            return pool
        pool = self.pools.get(name)
        if pool is None:
            raise ModelNotFound(name, list(self.pools))
        return pool

    def resolve_chat(self, name: str | None) -> ModelPool:
        """An instruct model for chat; base models are refused with a pointer to /complete."""
        pool = self.resolve(name, ModelKind.INSTRUCT)
        if pool.kind is not ModelKind.INSTRUCT:
            raise NotAChatModel(pool.name)
        return pool

    async def encode(self, pool: ModelPool, text: str) -> list[int]:
        """Token ids of a raw prompt; long prompts are tokenized off the event loop."""
        tokenizer = self.tokenizers[pool.name]
        if len(text) < INLINE_TOKENIZE_CHARS:
            return tokenizer.encode(text)
        return await asyncio.to_thread(tokenizer.encode, text)

    async def render(self, pool: ModelPool, messages: Sequence[dict[str, str]]) -> RenderedPrompt:
        """Chat template rendering and tokenizing, off the event loop."""
        return await asyncio.to_thread(self.tokenizers[pool.name].render_chat, messages)

    def context_of(self, pool: ModelPool) -> int:
        """The model's context length; unknown only while no worker has answered yet."""
        context = pool.max_model_len
        if context is None:
            pool.pick()  # raises the 503 that explains why we don't know yet
            raise GatewayError(f"context length of '{pool.name}' is unknown")
        return context

    def completion_body(
        self,
        pool: ModelPool,
        prompts: list[list[int]],
        requested_max_tokens: int | None,
        params: dict[str, Any],
        stream: bool,
    ) -> dict[str, Any]:
        """The body for a worker's /v1/completions, with max_tokens fitted to the context."""
        context = self.context_of(pool)
        longest = max(len(ids) for ids in prompts)
        max_tokens = fit_max_tokens(longest, requested_max_tokens, context, self.settings.default_max_tokens)
        body: dict[str, Any] = {
            **params,
            "model": pool.name,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, pool: ModelPool, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed completion from the least busy healthy worker."""
        with pool.lease() as worker:
            return await self.upstream.complete(worker, body)

    async def stream(
        self,
        pool: ModelPool,
        body: dict[str, Any],
        make_translator: Callable[[], StreamTranslator] | None,
    ) -> Response:
        """A streamed completion: errors before the first byte are ordinary error responses;
        after it, an SSE error event then `[DONE]`. `None` translator passes events through."""
        worker = pool.acquire()
        try:
            response = await self.upstream.open_stream(worker, body)
        except BaseException:
            pool.release(worker)
            raise

        async def close() -> None:
            await response.aclose()
            pool.release(worker)

        translator = make_translator() if make_translator else None
        events = _relay(iter_sse_data(response, worker), translator, worker)
        return RelayResponse(events, on_close=close)


class RelayResponse(StreamingResponse):
    """An event stream whose upstream side is closed exactly once, however the client leaves
    (even before the first byte), so the worker aborts the generation and the slot is freed."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._closed:
                self._closed = True
                await self._on_close()


async def _relay(
    payloads: AsyncIterator[str], translator: StreamTranslator | None, worker: Worker
) -> AsyncIterator[bytes]:
    try:
        async for payload in payloads:
            if translator is None:
                yield b"data: " + payload.encode() + b"\n\n"
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                yield sse_event(chunk)
                break
            for event in translator.on_chunk(chunk):
                yield sse_event(event)
        else:
            if translator is not None:
                for event in translator.finish():
                    yield sse_event(event)
    except GatewayError as exc:
        log.warning("stream from worker %s broke: %s", worker.label, exc.message)
        yield sse_event(exc.envelope())
    except ValueError:
        log.warning("worker %s sent a malformed stream event", worker.label)
        yield sse_event(error_body("The model worker sent a malformed event.", "upstream_error"))
    yield DONE_EVENT
