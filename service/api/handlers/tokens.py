"""vLLM's tokenizer routes, served from the gateway's own tokenizers (no worker involved):
POST /tokenize (a prompt, or chat messages rendered exactly as a chat request would be),
POST /detokenize, GET /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads).

A request without `model` gets the first base model for a prompt (evaluation harnesses score base
models) and the first instruct model for messages; a key whose policy allows no base model gets the first
model it may use for a prompt (any model tokenizes one)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse, Response

from service.api.deps import CallerDep, GatewayDep
from service.core.caps import enforce_caps
from service.core.context import RequestContext
from service.core.conversation import messages_as_dicts
from service.core.gateway import Gateway
from service.core.protocol import DetokenizeRequest, TokenizeRequest
from service.core.templates import ChatOptions, ModelTokenizer
from service.errors import InvalidRequest
from service.ops.settings import ModelKind
from service.workers.contract import check_fields

INLINE_TOKENS = 4096  # answers of up to this many tokens are built on the loop (about a millisecond)
JSON_SLICE = 8192


async def tokenize(gateway: Gateway, request: TokenizeRequest, ctx: RequestContext) -> Response:
    """POST /tokenize: `{count, max_model_len, tokens, token_strs}`, as vLLM answers it."""
    record = ctx.record
    enforce_caps(request, gateway.settings)
    if request.messages is not None:
        model = gateway.resolve(request.model, ModelKind.INSTRUCT, ctx.caller)
        model.require_chat()
        check_fields(model.pool, "TokenizeChatRequest", request.extras(), need_worker=False)
        options = ChatOptions.of(request)  # a request's template: refused unless the model trusts them
        record.admit(model.name)
        messages = messages_as_dicts(request.messages)
        tokens = (await gateway.render(model, messages, options, record, ctx.caller.cache_group)).token_ids
    elif request.prompt is not None:
        model = gateway.resolve(request.model, ModelKind.BASE, ctx.caller, any_kind=True)
        check_fields(model.pool, "TokenizeCompletionRequest", request.extras(), need_worker=False)
        record.admit(model.name)
        tokens = await gateway.encode(model, request.prompt, request.add_special_tokens is not False)
    else:
        raise InvalidRequest(
            "Send `prompt` (text) or `messages` (a conversation) to tokenize.", param="prompt"
        )
    tokenizer = model.tokenizer
    if len(tokens) <= INLINE_TOKENS:
        strings = tokenizer.token_strings(tokens) if request.return_token_strs else None
        answer = {"count": len(tokens), "max_model_len": model.max_model_len, "tokens": tokens}
        return JSONResponse({**answer, "token_strs": strings})
    # A long answer is built in a thread, in slices, so that the loop runs in between.
    body = await asyncio.to_thread(
        _tokenize_answer, tokens, model.max_model_len, tokenizer if request.return_token_strs else None
    )
    return Response(body, media_type="application/json")


async def detokenize(gateway: Gateway, request: DetokenizeRequest, ctx: RequestContext) -> Response:
    """POST /detokenize: `{prompt}`, the text of the ids (special tokens written out, as vLLM does)."""
    record = ctx.record
    enforce_caps(request, gateway.settings)
    model = gateway.resolve(request.model, ModelKind.BASE, ctx.caller, any_kind=True)
    check_fields(model.pool, "DetokenizeRequest", request.extras(), need_worker=False)
    record.admit(model.name)
    tokenizer = model.tokenizer
    tokens = request.tokens
    if tokens and max(tokens) >= tokenizer.vocab_size:
        unknown = next(token for token in tokens if token >= tokenizer.vocab_size)
        raise InvalidRequest(
            f"Token id {unknown} is not in the vocabulary of '{model.name}' ({tokenizer.vocab_size} ids).",
            param="tokens",
        )
    if len(tokens) <= INLINE_TOKENS:
        return JSONResponse({"prompt": tokenizer.decode(tokens)})
    return JSONResponse({"prompt": await asyncio.to_thread(tokenizer.decode, tokens)})


def _tokenize_answer(
    tokens: list[int], max_model_len: int | None, strings_of: ModelTokenizer | None
) -> bytes:
    """The /tokenize answer as JSONResponse writes it, serialised a slice at a time."""
    strings = _json_list(strings_of.token_strings(tokens)) if strings_of is not None else "null"
    return (
        f'{{"count":{len(tokens)},"max_model_len":{json.dumps(max_model_len)},'
        f'"tokens":{_json_list(tokens)},"token_strs":{strings}}}'
    ).encode()


def _json_list(items: Sequence[Any]) -> str:
    """A JSON array of `items`, written slice by slice (between two, another thread may run)."""
    slices = (
        json.dumps(items[start : start + JSON_SLICE], ensure_ascii=False, separators=(",", ":"))[1:-1]
        for start in range(0, len(items), JSON_SLICE)
    )
    return "[" + ",".join(slices) + "]"


async def tokenizer_info(gateway: GatewayDep, caller: CallerDep, model: str | None = None) -> dict[str, Any]:
    """GET /tokenizer_info[?model=]: the tokenizer's configuration (special tokens, class, chat
    template), as vLLM's server publishes it; `model_max_length` is the model's context length."""
    served = gateway.resolve(model, ModelKind.BASE, caller, any_kind=True)
    tokenizer = served.tokenizer
    info: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.config}
    info.update({name: text for name, text in tokenizer.special_tokens.items()})
    if served.max_model_len is not None:  # the model's real context, not the file's "no limit" (1e30)
        info["model_max_length"] = served.max_model_len
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return info
