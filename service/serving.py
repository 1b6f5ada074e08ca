"""What each generation endpoint does, between its thin route and the shared `Gateway` steps."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, Response

from service.caps import enforce_caps
from service.fewshot import build_few_shot
from service.gateway import Gateway
from service.observe import RequestRecord
from service.pool import ModelPool
from service.protocol import ChatRequest, CompleteRequest, RenderRequest, V1ChatRequest, V1CompletionRequest
from service.settings import ModelKind
from service.templates import RenderedPrompt, messages_as_dicts
from service.translate import NativeStream, OpenAIChatStream, native_chat, native_complete, openai_chat


async def complete(gateway: Gateway, request: CompleteRequest, record: RequestRecord) -> Response:
    """POST /complete: raw continuation, or a few-shot pattern when examples are given."""
    enforce_caps(request, gateway.settings)
    pool = gateway.resolve(request.model, ModelKind.BASE)
    record.admit(pool.name)
    params = request.engine_params()
    prompt = request.prompt
    if request.examples:
        prompt, boundary = build_few_shot(request.prompt, request.examples, request.layout)
        params.setdefault("stop", boundary)
    ids = await gateway.encode(pool, prompt)
    body = gateway.completion_body(pool, [ids], request.max_tokens, params, request.stream)
    if request.stream:
        return await gateway.stream(pool, body, record, NativeStream(pool.name, "text"))
    return JSONResponse(native_complete(await gateway.generate(pool, body, record), pool.name))


async def chat(gateway: Gateway, request: ChatRequest, record: RequestRecord) -> Response:
    """POST /chat: the next assistant turn, rendered with the model's own chat template."""
    pool, rendered = await _admit_chat(gateway, request, record)
    params = request.engine_params()
    body = gateway.completion_body(pool, [rendered.token_ids], request.max_tokens, params, request.stream)
    if request.stream:
        return await gateway.stream(pool, body, record, NativeStream(pool.name, "delta"))
    return JSONResponse(native_chat(await gateway.generate(pool, body, record), pool.name))


async def render(gateway: Gateway, request: RenderRequest, record: RequestRecord) -> Response:
    """POST /chat/render: the exact prompt text and token ids a /chat request would send."""
    enforce_caps(request, gateway.settings)
    pool = gateway.resolve(request.model, ModelKind.INSTRUCT)
    record.admit(pool.name)
    gateway.require_chat(pool)
    rendered = await gateway.render(pool, messages_as_dicts(request.messages))
    return JSONResponse(
        {
            "model": pool.name,
            "prompt": rendered.text,
            "token_ids": rendered.token_ids,
            "num_tokens": len(rendered.token_ids),
        }
    )


async def v1_completions(gateway: Gateway, request: V1CompletionRequest, record: RequestRecord) -> Response:
    """POST /v1/completions: OpenAI text completion; the worker's answer passes through."""
    enforce_caps(request, gateway.settings)
    pool = gateway.resolve(request.model, ModelKind.BASE)
    record.admit(pool.name)
    prompts = await _prompt_ids(gateway, pool, request.prompt)
    body = gateway.completion_body(pool, prompts, request.max_tokens, request.engine_params(), request.stream)
    sequences = len(prompts) * request.n  # what the worker runs at once
    if request.stream:
        options = request.stream_options
        if options and options.continuous_usage_stats:
            body["stream_options"] = options.model_dump()
        # The gateway always asks for usage (to count tokens); the client gets it only if it asked.
        forward_usage = bool(options and options.include_usage)
        return await gateway.stream(pool, body, record, None, forward_usage, sequences=sequences)
    return JSONResponse(await gateway.generate(pool, body, record, sequences=sequences))


async def v1_chat(gateway: Gateway, request: V1ChatRequest, record: RequestRecord) -> Response:
    """POST /v1/chat/completions: rendered server-side, generated as a completion, shaped as chat."""
    pool, rendered = await _admit_chat(gateway, request, record)
    top = request.top_logprobs or 0
    body = gateway.completion_body(
        pool, [rendered.token_ids], request.requested_max_tokens, request.engine_params(), request.stream
    )
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return await gateway.stream(pool, body, record, OpenAIChatStream(pool.name, include_usage, top))
    return JSONResponse(openai_chat(await gateway.generate(pool, body, record), pool.name, top))


async def _admit_chat(
    gateway: Gateway, request: ChatRequest | V1ChatRequest, record: RequestRecord
) -> tuple[ModelPool, RenderedPrompt]:
    """Checks shared by both chat endpoints, then the rendered prompt."""
    enforce_caps(request, gateway.settings)
    pool = gateway.resolve(request.model, ModelKind.INSTRUCT)
    record.admit(pool.name)
    gateway.require_chat(pool)
    return pool, await gateway.render(pool, messages_as_dicts(request.messages))


async def _prompt_ids(gateway: Gateway, pool: ModelPool, prompt: str | list[Any]) -> list[list[int]]:
    """Every OpenAI prompt form (text, texts, ids, lists of ids) as lists of token ids; several
    texts are tokenized in one batch, off the event loop."""
    if isinstance(prompt, str):
        return [await gateway.encode(pool, prompt)]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    texts = [item for item in prompt if isinstance(item, str)]
    encoded = iter(await gateway.encode_many(pool, texts))
    return [next(encoded) if isinstance(item, str) else list(item) for item in prompt]
