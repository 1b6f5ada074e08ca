"""The native API: /complete (raw continuation, few-shot patterns, scoring) and /chat, /chat/render
(the gateway renders the chat template and sends token ids to the worker's /v1/completions)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, Response

from service.core.caps import enforce_caps
from service.core.context import RequestContext
from service.core.conversation import messages_as_dicts
from service.core.fewshot import build_few_shot
from service.core.gateway import Gateway
from service.core.protocol import ChatRequest, CompleteRequest, RenderRequest
from service.core.served import ServedModel
from service.core.templates import RenderedPrompt
from service.core.tenancy import add_salt
from service.core.translate import NativeStream, native_chat, native_complete
from service.errors import InvalidRequest
from service.ops.settings import ModelKind
from service.workers.answer import parse_answer


async def complete(gateway: Gateway, request: CompleteRequest, ctx: RequestContext) -> Response:
    """POST /complete: raw continuation, a few-shot pattern when examples are given, or the
    loglikelihood of a given `continuation` when one is."""
    record = ctx.record
    enforce_caps(request, gateway.settings)
    model = gateway.resolve(request.model, ModelKind.BASE, ctx.caller)
    record.admit(model.name)
    params = request.engine_params()
    prompt = request.prompt
    if request.examples:
        prompt, boundary = build_few_shot(request.prompt, request.examples, request.layout)
        params.setdefault("stop", boundary)
    if request.continuation is not None:
        return JSONResponse(await score(gateway, model, request, prompt, ctx))
    ids = await gateway.encode(model, prompt, record=record)
    body = gateway.completion_body(model, [ids], request.max_tokens, params, request.stream)
    add_salt(body, ctx.caller, model.pool)  # with keys: the caller's prefix-cache salt
    hint = gateway.route_hint(model, ctx, ids)
    charge = gateway.charge(ctx.caller, model, [len(ids)], body["max_tokens"], request.n)
    if request.stream:
        translator = NativeStream(model.name, "text")
        return await gateway.stream(
            model, body, record, translator, sequences=request.n, hint=hint, charge=charge
        )
    answer = await gateway.generate(model, body, record, sequences=request.n, hint=hint, charge=charge)
    return JSONResponse(native_complete(await parse_answer(answer.raw, model.name), model.name))


async def score(
    gateway: Gateway, model: ServedModel, request: CompleteRequest, prompt: str, ctx: RequestContext
) -> dict[str, Any]:
    """The loglikelihood of `request.continuation` after `prompt`: each continuation token's
    logprob (and rank), their sum, and whether greedy decoding would have produced it, from the
    worker's prompt logprobs for context + continuation (nothing is generated for the client)."""
    _refuse_generation_fields(request)
    continuation = request.continuation or ""
    context_ids, continuation_ids = await gateway.encode_pair(model, prompt, continuation, ctx.record)
    if not continuation_ids:
        raise InvalidRequest("The continuation to score is empty (no tokens).", param="continuation")
    whole = context_ids + continuation_ids
    gateway.check_context(model, len(whole), 1)
    gateway.check_scoring(model, request, len(whole))
    body = {"model": model.name, "prompt": whole, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0}
    add_salt(body, ctx.caller, model.pool)  # with keys: the caller's prefix-cache salt
    charge = gateway.charge(ctx.caller, model, [len(whole)], 1)
    hint = gateway.route_hint(model, ctx, whole)
    sent = await gateway.generate(model, body, ctx.record, hint=hint, charge=charge)
    answer = await parse_answer(sent.raw, model.name)
    rows = (answer.get("choices") or [{}])[0].get("prompt_logprobs") or []
    tokens = [
        _scored(token_id, row)
        for token_id, row in zip(continuation_ids, rows[len(context_ids) :], strict=False)
    ]
    if len(tokens) != len(continuation_ids):
        raise InvalidRequest(
            "The worker returned fewer prompt logprobs than prompt tokens.", param="continuation"
        )
    return {
        "id": answer.get("id", ""),
        "model": model.name,
        "loglikelihood": sum(token["logprob"] for token in tokens),
        "is_greedy": all(token["rank"] == 1 for token in tokens),
        "tokens": tokens,
        "usage": {"prompt_tokens": len(whole), "completion_tokens": 0, "total_tokens": len(whole)},
        "context_tokens": len(context_ids),
    }


def _refuse_generation_fields(request: CompleteRequest) -> None:
    """Scoring generates nothing: a field that only shapes generation is refused, naming it, rather
    than silently ignored (a client sending `max_tokens` expects text it would not get)."""
    sent = {"max_tokens": request.max_tokens is not None, "stop": request.stop is not None,
            "n": request.n != 1, "stream": request.stream}  # fmt: skip
    for field, given in sent.items():
        if given:
            raise InvalidRequest(
                f"`{field}` does not apply when scoring a `continuation`: nothing is generated, the answer "
                f"is the continuation's logprobs. Leave `{field}` out, or leave `continuation` out to "
                "generate text.",
                param=field,
            )


def _scored(token_id: int, row: dict[str, Any] | None) -> dict[str, Any]:
    """One continuation token from a worker's prompt-logprobs row (keyed by token id)."""
    entry = (row or {}).get(str(token_id)) or {}
    return {
        "id": token_id,
        "text": entry.get("decoded_token", ""),
        "logprob": float(entry.get("logprob", float("-inf"))),
        "rank": entry.get("rank"),
    }


async def chat(gateway: Gateway, request: ChatRequest, ctx: RequestContext) -> Response:
    """POST /chat: the next assistant turn, rendered with the model's own chat template."""
    record = ctx.record
    model, rendered = await _admit_chat(gateway, request, ctx)
    params = request.engine_params()
    if model.chat_stop_token_ids:  # its template's end of turn, which the worker does not stop at
        params["stop_token_ids"] = list(model.chat_stop_token_ids)
    body = gateway.completion_body(
        model, [rendered.token_ids], request.max_tokens, params, request.stream, prompt_param="messages"
    )
    add_salt(body, ctx.caller, model.pool)  # with keys: the caller's prefix-cache salt
    hint = gateway.route_hint(model, ctx, rendered.token_ids)
    charge = gateway.charge(ctx.caller, model, [len(rendered.token_ids)], body["max_tokens"], request.n)
    if request.stream:
        translator = NativeStream(model.name, "delta")
        return await gateway.stream(
            model, body, record, translator, sequences=request.n, hint=hint, charge=charge
        )
    answer = await gateway.generate(model, body, record, sequences=request.n, hint=hint, charge=charge)
    return JSONResponse(native_chat(await parse_answer(answer.raw, model.name), model.name))


async def render(gateway: Gateway, request: RenderRequest, ctx: RequestContext) -> Response:
    """POST /chat/render: the exact prompt text and token ids a /chat request would send."""
    model, rendered = await _admit_chat(gateway, request, ctx)
    return JSONResponse(
        {
            "model": model.name,
            "prompt": rendered.text,
            "token_ids": rendered.token_ids,
            "num_tokens": len(rendered.token_ids),
        }
    )


async def _admit_chat(
    gateway: Gateway, request: ChatRequest | RenderRequest, ctx: RequestContext
) -> tuple[ServedModel, RenderedPrompt]:
    """Checks shared by the native chat endpoints, then the rendered prompt."""
    record = ctx.record
    enforce_caps(request, gateway.settings)
    model = gateway.resolve(request.model, ModelKind.INSTRUCT, ctx.caller)
    record.admit(model.name)
    model.require_chat()
    messages = messages_as_dicts(request.messages)
    return model, await gateway.render(model, messages, record=ctx.record, cache_group=ctx.caller.cache_group)
