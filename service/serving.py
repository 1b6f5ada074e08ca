"""What each generation endpoint does, between its thin route and the shared `Gateway` steps."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, Response

from service.errors import InvalidRequest
from service.fewshot import build_few_shot
from service.gateway import Gateway
from service.pool import ModelPool
from service.protocol import ChatRequest, CompleteRequest, RenderRequest, V1ChatRequest, V1CompletionRequest
from service.settings import ModelKind
from service.templates import messages_as_dicts
from service.translate import NativeStream, OpenAIChatStream, native_chat, native_complete, openai_chat


async def complete(gateway: Gateway, request: CompleteRequest) -> Response:
    """POST /complete: raw continuation, or a few-shot pattern when examples are given."""
    pool = gateway.resolve(request.model, ModelKind.BASE)
    params = request.engine_params()
    prompt = request.prompt
    if request.examples:
        prompt, boundary = build_few_shot(request.prompt, request.examples, request.layout)
        params.setdefault("stop", boundary)
    ids = await gateway.encode(pool, prompt)
    body = gateway.completion_body(pool, [ids], request.max_tokens, params, request.stream)
    if request.stream:
        return await gateway.stream(pool, body, lambda: NativeStream(pool.name, "text"))
    return JSONResponse(native_complete(await gateway.generate(pool, body), pool.name))


async def chat(gateway: Gateway, request: ChatRequest) -> Response:
    """POST /chat: the next assistant turn, rendered with the model's own chat template."""
    pool = gateway.resolve_chat(request.model)
    rendered = await gateway.render(pool, messages_as_dicts(request.messages))
    params = request.engine_params()
    body = gateway.completion_body(pool, [rendered.token_ids], request.max_tokens, params, request.stream)
    if request.stream:
        return await gateway.stream(pool, body, lambda: NativeStream(pool.name, "delta"))
    return JSONResponse(native_chat(await gateway.generate(pool, body), pool.name))


async def render(gateway: Gateway, request: RenderRequest) -> dict[str, Any]:
    """POST /chat/render: the exact prompt text and token ids a /chat request would send."""
    pool = gateway.resolve_chat(request.model)
    rendered = await gateway.render(pool, messages_as_dicts(request.messages))
    return {
        "model": pool.name,
        "prompt": rendered.text,
        "token_ids": rendered.token_ids,
        "num_tokens": len(rendered.token_ids),
    }


async def v1_completions(gateway: Gateway, request: V1CompletionRequest) -> Response:
    """POST /v1/completions: OpenAI text completion; the worker's answer passes through."""
    pool = gateway.resolve(request.model, ModelKind.BASE)
    prompts = await _prompt_ids(gateway, pool, request.prompt)
    body = gateway.completion_body(pool, prompts, request.max_tokens, request.engine_params(), request.stream)
    if request.stream:
        # Events pass through untouched, so usage comes only if the client asked for it.
        body.pop("stream_options", None)
        if request.stream_options:
            body["stream_options"] = request.stream_options.model_dump()
        return await gateway.stream(pool, body, None)
    return JSONResponse(await gateway.generate(pool, body))


async def v1_chat(gateway: Gateway, request: V1ChatRequest) -> Response:
    """POST /v1/chat/completions: rendered server-side, generated as a completion, shaped as chat."""
    pool = gateway.resolve_chat(request.model)
    rendered = await gateway.render(pool, messages_as_dicts(request.messages))
    top = request.top_logprobs or 0
    body = gateway.completion_body(
        pool, [rendered.token_ids], request.requested_max_tokens, request.engine_params(), request.stream
    )
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return await gateway.stream(pool, body, lambda: OpenAIChatStream(pool.name, include_usage, top))
    return JSONResponse(openai_chat(await gateway.generate(pool, body), pool.name, top))


async def _prompt_ids(gateway: Gateway, pool: ModelPool, prompt: str | list[Any]) -> list[list[int]]:
    """Every OpenAI prompt form (text, texts, ids, lists of ids) as lists of token ids."""
    if isinstance(prompt, str):
        return [await gateway.encode(pool, prompt)]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    prompts: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append(await gateway.encode(pool, item))
        elif isinstance(item, list):
            prompts.append(list(item))
        else:
            raise InvalidRequest("prompt must be text, a list of texts, or token ids", param="prompt")
    return prompts
