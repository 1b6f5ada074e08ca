"""vLLM's tokenizer routes, served from the gateway's own tokenizers (no worker involved):
POST /tokenize (a prompt, or chat messages rendered exactly as a chat request would be),
POST /detokenize, GET /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads).

A request without `model` gets the first base model for a prompt (evaluation harnesses score base
models) and the first instruct model for messages."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, Response

from service.api.deps import GatewayDep
from service.core.caps import enforce_caps
from service.core.context import RequestContext
from service.core.conversation import messages_as_dicts
from service.core.gateway import Gateway
from service.core.protocol import DetokenizeRequest, TokenizeRequest
from service.core.templates import ChatOptions
from service.errors import InvalidRequest
from service.ops.settings import ModelKind
from service.workers.contract import check_fields


async def tokenize(gateway: Gateway, request: TokenizeRequest, ctx: RequestContext) -> Response:
    """POST /tokenize: `{count, max_model_len, tokens, token_strs}`, as vLLM answers it."""
    record = ctx.record
    enforce_caps(request, gateway.settings)
    if request.messages is not None:
        pool = gateway.resolve(request.model, ModelKind.INSTRUCT)
        gateway.require_chat(pool)
        check_fields(pool, "TokenizeChatRequest", request.extras(), need_worker=False)
        options = ChatOptions(
            tools=request.tools,
            add_generation_prompt=request.add_generation_prompt is not False,
            continue_final_message=bool(request.continue_final_message),
            template_kwargs=request.chat_template_kwargs,
            add_special_tokens=bool(request.add_special_tokens),
            chat_template=request.chat_template,  # refused in the render unless the model trusts them
        )
        record.admit(pool.name)
        tokens = (await gateway.render(pool, messages_as_dicts(request.messages), options, record)).token_ids
    elif request.prompt is not None:
        pool = gateway.resolve(request.model, ModelKind.BASE)
        check_fields(pool, "TokenizeCompletionRequest", request.extras(), need_worker=False)
        record.admit(pool.name)
        tokens = await gateway.encode(pool, request.prompt, request.add_special_tokens is not False)
    else:
        raise InvalidRequest(
            "Send `prompt` (text) or `messages` (a conversation) to tokenize.", param="prompt"
        )
    strings = gateway.tokenizers[pool.name].token_strings(tokens) if request.return_token_strs else None
    return JSONResponse(
        {"count": len(tokens), "max_model_len": pool.max_model_len, "tokens": tokens, "token_strs": strings}
    )


async def detokenize(gateway: Gateway, request: DetokenizeRequest, ctx: RequestContext) -> Response:
    """POST /detokenize: `{prompt}`, the text of the ids (special tokens written out, as vLLM does)."""
    record = ctx.record
    pool = gateway.resolve(request.model, ModelKind.BASE)
    check_fields(pool, "DetokenizeRequest", request.extras(), need_worker=False)
    record.admit(pool.name)
    tokenizer = gateway.tokenizers[pool.name]
    unknown = next((token for token in request.tokens if token >= tokenizer.vocab_size), None)
    if unknown is not None:
        raise InvalidRequest(
            f"Token id {unknown} is not in the vocabulary of '{pool.name}' ({tokenizer.vocab_size} ids).",
            param="tokens",
        )
    return JSONResponse({"prompt": tokenizer.decode(request.tokens)})


async def tokenizer_info(gateway: GatewayDep, model: str | None = None) -> dict[str, Any]:
    """GET /tokenizer_info[?model=]: the tokenizer's configuration (special tokens, class, chat
    template), as vLLM's server publishes it."""
    pool = gateway.resolve(model, ModelKind.BASE)
    tokenizer = gateway.tokenizers[pool.name]
    info: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.config}
    info.update({name: text for name, text in tokenizer.special_tokens.items()})
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return info
