"""The OpenAI-compatible API, a faithful superset of vLLM's: every request goes to the worker's own
endpoint of the same name, as the client sent it (fields the worker's schema accepts; the served
model name filled in), and the worker's answer comes back as it is. In front, the gateway adds what
vLLM does not have: kind-aware routing, the control-token rule, context and scoring checks with the
numbers, caps, queueing, failover, metrics. Chat features that need the model's parsers (tool calls,
reasoning, structured outputs) therefore run in vLLM's own code, on the worker.

The gateway still renders each conversation itself (the same template the worker is pinned to) for
the context check, control tokens and routing; the token counts it reports come from the worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from service.core.caps import enforce_caps, prompt_logprobs_source, prompt_texts
from service.core.chat_render import request_variables
from service.core.context import RequestContext
from service.core.conversation import messages_as_dicts
from service.core.gateway import CHAT_PATH, COMPLETIONS_PATH, Gateway
from service.core.key_limits import Charge
from service.core.protocol import (
    ROLE_RULE,
    OpenAIRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
    is_plain_name,
)
from service.core.relay import RESPONSES_STREAM
from service.core.responses_input import responses_messages
from service.core.served import ServedModel
from service.core.templates import ChatOptions, ModelTokenizer
from service.core.tenancy import (
    SALT_FIELD,
    check_client_fields,
    check_stored_responses,
    with_salt,
    worker_salt,
)
from service.errors import InvalidRequest, VllmRefusal
from service.ops.record import RequestRecord
from service.ops.settings import ModelKind, RoutingPolicy
from service.workers.answer import Answer
from service.workers.contract import check_fields

BATCH_CHAT_PATH = "/v1/chat/completions/batch"
# vLLM's refusal of a chat template sent to a worker that does not trust them.
UNTRUSTED_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
SEND_SLICE_BYTES = 1 << 20
RESPONSES_PATH = "/v1/responses"


async def completions(gateway: Gateway, request: V1CompletionRequest, ctx: RequestContext) -> Response:
    """POST /v1/completions: text prompts go as text (so `echo` returns them as sent) unless the
    gateway's BOS rule changed their tokens; token-id prompts go as ids. The context is the worker's to
    check (vLLM refuses a prompt or a max_tokens over it, in its words, and fits max_tokens to the rest)."""
    record = ctx.record
    model = _admit(gateway, request, ctx, ModelKind.BASE, "CompletionRequest")
    if request.empty_prompt:  # vLLM decides what an empty one is; a key's budget still pays what it makes
        special = len(model.tokenizer.encode("", request.add_special_tokens is not False))  # BOS, if any
        charge = gateway.charge(ctx.caller, model, [special], request.max_tokens, request.choices)
        sequences = request.prompts * request.choices
        return await _send(gateway, model, request, ctx, COMPLETIONS_PATH, sequences, charge=charge)
    if not _needs_tokens(model, request):
        # No tokens needed. A key's token budget reserves a single prompt's upper bound (settled with
        # the worker's count) while this process holds plenty of it; near its end, or for a batch of
        # prompts, they are counted exactly. Without a budget they go untokenized, whatever they are.
        bound = _surely_fits(gateway, model, request)
        bounds = [bound] if bound and request.max_tokens is not None else None
        charge = gateway.charge(ctx.caller, model, bounds, request.max_tokens, request.choices)
        if not _budgeted(charge) or (bound and gateway.holds_plenty(charge)):
            sequences = request.prompts * request.choices
            return await _send(gateway, model, request, ctx, COMPLETIONS_PATH, sequences, charge=charge)
    prompts, rewritten = await _prompt_tokens(gateway, model, request, record)
    lengths = [
        _truncated(len(ids), request.truncate_prompt_tokens, gateway.context_of(model)) for ids in prompts
    ]
    gateway.check_scoring(model, request, sum(lengths))
    # The BOS rule changed a text prompt's tokens: the worker gets the gateway's ids instead.
    changes = {"prompt": prompts[0] if isinstance(request.prompt, str) else prompts} if rewritten else None
    sequences = len(prompts) * request.choices
    charge = gateway.charge(ctx.caller, model, lengths, request.max_tokens, request.choices)
    return await _send(
        gateway, model, request, ctx, COMPLETIONS_PATH, sequences, changes, prompts[0], charge=charge
    )


async def chat(gateway: Gateway, request: V1ChatRequest, ctx: RequestContext) -> Response:
    """POST /v1/chat/completions on the worker's own chat endpoint (tools, reasoning, structured
    outputs, echo, continue_final_message... all vLLM's)."""
    model = _admit(gateway, request, ctx, ModelKind.INSTRUCT, "ChatCompletionRequest")
    if not request.messages:  # vLLM decides what an empty conversation is; a key's budget still pays
        empty = await gateway.empty_chat_tokens(model, ChatOptions.of(request))
        charge = gateway.charge(ctx.caller, model, [empty], request.requested_max_tokens, request.choices)
        return await _send(gateway, model, request, ctx, CHAT_PATH, request.choices, charge=charge)
    tokens = await _check_conversation(gateway, model, request, request.messages, ctx)
    gateway.check_scoring(model, request, len(tokens))
    charge = gateway.charge(ctx.caller, model, [len(tokens)], request.requested_max_tokens, request.choices)
    return await _send(gateway, model, request, ctx, CHAT_PATH, request.choices, tokens=tokens, charge=charge)


async def batch_chat(gateway: Gateway, request: V1BatchChatRequest, ctx: RequestContext) -> Response:
    """POST /v1/chat/completions/batch: several conversations in one call (vLLM's batch route)."""
    model = _admit(gateway, request, ctx, ModelKind.INSTRUCT, "BatchChatCompletionRequest")
    sequences = len(request.messages) * request.choices
    # vLLM decides what an empty conversation (or none) is; the others are checked all the same, and a
    # key's budget pays for every one.
    rendered = [
        await _check_conversation(gateway, model, request, conversation, ctx, f"messages.{index}")
        if conversation else None
        for index, conversation in enumerate(request.messages)
    ]  # fmt: skip
    options = ChatOptions.of(request)
    empty = await gateway.empty_chat_tokens(model, options) if None in rendered else 0  # once for them all
    lengths = [len(tokens) if tokens is not None else empty for tokens in rendered]
    gateway.check_scoring(model, request, sum(lengths))  # they run together
    first = rendered[0] if rendered else None
    charge = gateway.charge(ctx.caller, model, lengths, request.requested_max_tokens, request.choices)
    # vLLM's batch route answers whole even when asked to stream, and so does this one.
    return await _send(
        gateway, model, request, ctx, BATCH_CHAT_PATH, sequences, tokens=first, whole=True, charge=charge
    )


async def responses(gateway: Gateway, request: V1ResponsesRequest, ctx: RequestContext) -> Response:
    """POST /v1/responses: OpenAI's Responses API on an instruct model, served by the worker."""
    record = ctx.record
    fields = request.model_extra or {}
    check_stored_responses(fields)
    check_client_fields(ctx.caller, fields)
    enforce_caps(request, gateway.settings)
    model = gateway.resolve(request.model, ModelKind.INSTRUCT, ctx.caller)
    record.admit(model.name)
    model.require_chat()
    if model.worker_chat_template is not None:
        raise InvalidRequest(
            f"'{model.name}' renders chats with a chat template of its own, which vLLM's Responses API "
            "cannot be given; use /v1/chat/completions (or /chat).",
            param="model",
        )
    check_fields(model.pool, "ResponsesRequest", request.extras())
    # Everything vLLM hands its template from this request, scanned off the event loop.
    await asyncio.to_thread(_check_responses_texts, model.tokenizer, request)
    # The messages vLLM builds from the items, rendered: the check on the result, and prefix routing.
    messages = responses_messages(request.instructions, request.input)
    reasoning = fields.get("reasoning")
    effort = {"reasoning_effort": reasoning.get("effort")} if isinstance(reasoning, dict) else {}
    kwargs = fields.get("chat_template_kwargs")
    variables = request_variables(effort, kwargs if isinstance(kwargs, dict) else {})
    options = ChatOptions(param="input", variables=variables)
    tokens = (await gateway.render(model, messages, options, record, ctx.caller.cache_group)).token_ids
    hint = gateway.route_hint(model, ctx, tokens, _user(request))
    salt = worker_salt(ctx.caller, model.pool, RESPONSES_PATH, fields.get(SALT_FIELD))
    charge = gateway.charge(ctx.caller, model, [len(tokens)] if tokens else None, request.max_output_tokens)
    if request.stream:
        body = with_salt(request.body(model.name), salt)
        return await gateway.stream(
            model, body, record, None, path=RESPONSES_PATH, fmt=RESPONSES_STREAM, hint=hint, charge=charge
        )
    sent = with_salt(request.as_sent(model.name), salt)
    return as_is(await gateway.generate(model, sent, record, path=RESPONSES_PATH, hint=hint, charge=charge))


def as_is(answer: Answer) -> Response:
    """The worker's answer, its bytes unchanged (every field it sent, in its own serialisation)."""
    return AnswerResponse(memoryview(answer.raw), media_type="application/json")


class AnswerResponse(Response):
    """A response whose large body is handed to the server in slices, each sent once the client has
    taken the last: the server never buffers a copy of a large answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body
        if len(body) <= SEND_SLICE_BYTES:
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        view = memoryview(body)
        for start in range(0, len(view), SEND_SLICE_BYTES):
            more = start + SEND_SLICE_BYTES < len(view)
            await send({"type": "http.response.body", "body": view[start : start + SEND_SLICE_BYTES],
                        "more_body": more})  # fmt: skip


def _admit(
    gateway: Gateway, request: OpenAIRequest, ctx: RequestContext, kind: ModelKind, schema: str
) -> ServedModel:
    """Checks every /v1 generation request goes through before any work is done."""
    enforce_caps(request, gateway.settings)
    # /v1/completions serves any model (as vLLM's does): a key allowed no base model defaults to its first
    model = gateway.resolve(request.model, kind, ctx.caller, any_kind=kind is ModelKind.BASE)
    ctx.record.admit(model.name)
    if kind is ModelKind.INSTRUCT:
        model.require_chat()
    check_fields(model.pool, schema, request.extras())
    return model


async def _check_conversation(
    gateway: Gateway,
    model: ServedModel,
    request: V1ChatRequest | V1BatchChatRequest,
    messages: list[Any],
    ctx: RequestContext,
    param: str = "messages",
) -> list[int]:
    """Render one conversation as the worker will (control tokens refused in the render, off the
    event loop); its token ids. The context is the worker's to check, as for completions."""
    if _sends_template(request) and not model.spec.trust_request_chat_template:
        raise VllmRefusal(400, "BadRequestError", UNTRUSTED_TEMPLATE)  # the worker would refuse it so
    options = ChatOptions.of(request, param)
    group = ctx.caller.cache_group
    rendered = await gateway.render(model, messages_as_dicts(messages), options, ctx.record, group)
    return rendered.token_ids


def _sends_template(request: V1ChatRequest | V1BatchChatRequest) -> bool:
    """Whether the request brings a chat template of its own (as vLLM tells: the field, or one in
    `chat_template_kwargs`)."""
    kwargs = request.chat_template_kwargs or {}
    return request.chat_template is not None or kwargs.get("chat_template") is not None


async def _send(
    gateway: Gateway,
    model: ServedModel,
    request: OpenAIRequest,
    ctx: RequestContext,
    path: str,
    sequences: int,
    changes: dict[str, Any] | None = None,
    tokens: list[int] | None = None,
    whole: bool = False,
    *,
    charge: Charge | None,
) -> Response:
    """The worker's answer, streamed or whole. The worker gets the request as the client sent it (its
    very bytes when nothing changes), plus the caller's cache salt when keys are configured. A stream
    always asks the worker for usage (the gateway counts tokens); the client gets that usage event only
    if it asked for it. `charge` has no default: every route says what a key's budget pays for it (None
    only without a key), so no path sends for free by forgetting it."""
    record = ctx.record
    extras = request.model_extra or {}
    check_client_fields(ctx.caller, extras)
    if path != COMPLETIONS_PATH:
        changes = _own_chat(model, request, changes)
    salt = worker_salt(ctx.caller, model.pool, path, extras.get(SALT_FIELD))  # None: the body stays as it is
    hint = gateway.route_hint(model, ctx, tokens, _user(request))
    if request.stream and not whole:
        body = {**request.body(model.name), **(changes or {})}
        asked = bool(request.stream_options and request.stream_options.include_usage)
        body["stream_options"] = _usage_for_the_gateway(body.get("stream_options"), asked)
        return await gateway.stream(
            model, with_salt(body, salt), record, None, asked,
            sequences=sequences, path=path, hint=hint, charge=charge,
        )  # fmt: skip
    sent = {**request.body(model.name), **changes} if changes else request.as_sent(model.name)
    sent = with_salt(sent, salt)  # the client's own bytes: the salt spliced in, not re-serialised
    answer = await gateway.generate(
        model, sent, record, sequences=sequences, path=path, hint=hint, charge=charge
    )
    return as_is(answer)


def _usage_for_the_gateway(options: dict[str, Any] | None, asked: bool) -> dict[str, Any]:
    """The stream options the worker gets: usage always (the gateway counts tokens; its final chunk is
    dropped when the client did not ask). Per-chunk usage only if the client asked for usage: vLLM
    gives it only then, so a client asking `continuous_usage_stats` alone gets none, as from vLLM."""
    options = {**(options or {}), "include_usage": True}
    if not asked:
        options.pop("continuous_usage_stats", None)
    return options


def _own_chat(
    model: ServedModel, request: OpenAIRequest, changes: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A chat of a model with a template of its own (an instruct adapter's): the worker, which knows only
    its base model's, is sent the template, and the template's end of turn to stop at."""
    template = model.worker_chat_template
    if template is not None and getattr(request, "chat_template", None) is None:
        changes = {**(changes or {}), "chat_template": template}
    if model.chat_stop_token_ids:
        asked = (request.model_extra or {}).get("stop_token_ids")
        stops = [*(asked if isinstance(asked, list) else []), *model.chat_stop_token_ids]
        changes = {**(changes or {}), "stop_token_ids": stops}
    return changes


def _user(request: OpenAIRequest | V1ResponsesRequest) -> str | None:
    """The request's `user` field (OpenAI's end-user id), a session key for `session` routing."""
    user = (request.model_extra or {}).get("user")
    return user if isinstance(user, str) and user else None


async def _prompt_tokens(
    gateway: Gateway, model: ServedModel, request: V1CompletionRequest, record: RequestRecord
) -> tuple[list[list[int]], bool]:
    """Token ids of every prompt (texts tokenized as the worker would, in one batch, off the
    loop when large), and whether the gateway's BOS rule changed any text's tokens."""
    prompt = request.prompt
    assert prompt  # an empty prompt went to the worker as it was
    if isinstance(prompt, list) and isinstance(prompt[0], int):  # a list is of one kind: ids here
        return [list(prompt)], False
    items: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [item for item in items if isinstance(item, str)]
    if not texts:
        return [list(item) for item in items], False
    add_special = request.add_special_tokens is not False
    encoded = iter(await gateway.encode_for_worker(model, texts, add_special, record))
    prompts: list[list[int]] = []
    rewritten = False
    for item in items:
        if isinstance(item, str):
            ids, changed = next(encoded)
            prompts.append(ids)
            rewritten = rewritten or changed
        else:
            prompts.append(list(item))
    return prompts, rewritten


def _needs_tokens(model: ServedModel, request: V1CompletionRequest) -> bool:
    """Whether the gateway needs the prompts' tokens: for prefix routing, for the scoring budget (prompt
    logprobs, asked for or derived from `echo`), or because a text starts with BOS text (the BOS rule
    may change its tokens). Otherwise the prompts go to the worker untouched, untokenized."""
    if model.pool.policy is RoutingPolicy.PREFIX or prompt_logprobs_source(request) is not None:
        return True
    bos = model.tokenizer.bos_text
    if not bos:
        return False
    return any(text.startswith(bos) for text in prompt_texts(request))


def _budgeted(charge: Charge | None) -> bool:
    """Whether a request's key has a token budget (what it reserves must then bound what it may use)."""
    policy = charge.caller.policy if charge is not None else None
    return policy is not None and policy.token_budget is not None


def _surely_fits(gateway: Gateway, model: ServedModel, request: V1CompletionRequest) -> int:
    """The most tokens a single text prompt can be, when it certainly fits without tokenizing it (else
    0): a token never covers less than one UTF-8 byte, a tokenizer adds at most two special tokens, and
    the BOS rule can only change a prompt that starts with BOS text. (Scoring needs the exact count.)"""
    prompt = request.prompt
    if not isinstance(prompt, str) or request.prompt_logprobs is not None or request.echo:
        return 0
    bos = model.tokenizer.bos_text
    if bos and prompt.startswith(bos):
        return 0
    bound = len(prompt) * 4 if len(prompt) > 1024 else len(prompt.encode())  # 4 bytes per character at most
    return bound + 2 if bound + 2 + (request.max_tokens or 0) < gateway.context_of(model) else 0


def _truncated(length: int, truncate: int | None, context: int) -> int:
    """A prompt's length after vLLM's `truncate_prompt_tokens` (-1: to the context; other negative values
    vLLM refuses, and they count as no truncation: a length is never below nothing)."""
    if truncate is None or truncate < -1:
        return length
    return min(length, context if truncate == -1 else truncate)


def _check_responses_texts(tokenizer: ModelTokenizer, request: V1ResponsesRequest) -> None:
    """The control-token rule on what vLLM hands its template from a Responses request: input items
    (messages, function-call arguments as decoded, function-call outputs), instructions, tools and
    template variables; input roles are plain names, as chat roles are."""
    extras = request.model_extra or {}
    items = request.input if isinstance(request.input, list) else []
    for index, item in enumerate(items):
        role = item.get("role")
        if role is not None and not (isinstance(role, str) and is_plain_name(role)):
            raise InvalidRequest(f"input.{index}.role: {ROLE_RULE}.", param=f"input.{index}.role")
    tokenizer.check_text(request.input, "input")
    tokenizer.check_text(request.instructions, "instructions")
    tokenizer.check_text(extras.get("tools"), "tools")
    kwargs = extras.get("chat_template_kwargs")
    if isinstance(kwargs, dict):
        tokenizer.check_template_kwargs(kwargs)
    else:  # not an object: the worker's schema refuses it; its strings are scanned all the same
        tokenizer.check_text(kwargs, "chat_template_kwargs")
