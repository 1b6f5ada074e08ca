"""Configurable caps on what one request may ask for, checked before any work is done."""

from __future__ import annotations

from service.errors import InvalidRequest
from service.fewshot import few_shot_length
from service.protocol import (
    ChatRequest,
    CompleteRequest,
    RenderRequest,
    Sampling,
    V1ChatRequest,
    V1CompletionRequest,
)
from service.settings import Settings

AnyRequest = CompleteRequest | ChatRequest | RenderRequest | V1CompletionRequest | V1ChatRequest


def _over(param: str, asked: int, cap: int) -> InvalidRequest:
    return InvalidRequest(f"{param} is {asked}; this gateway allows at most {cap}.", param=param)


def prompt_chars(request: AnyRequest) -> int:
    """Characters of text the request asks the gateway to tokenize."""
    if isinstance(request, ChatRequest | RenderRequest | V1ChatRequest):
        return sum(len(message.text()) for message in request.messages)
    if isinstance(request, CompleteRequest):
        if not request.examples:
            return len(request.prompt)
        return few_shot_length(request.prompt, request.examples, request.layout)
    prompt = request.prompt
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(item) for item in prompt if isinstance(item, str))


def enforce_caps(request: AnyRequest, settings: Settings) -> None:
    """Raise a 400 naming the field when the request asks for more than the configured caps."""
    if isinstance(request, Sampling):
        if request.n > settings.max_n:
            raise _over("n", request.n, settings.max_n)
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stops) > settings.max_stop:
            raise _over("stop", len(stops), settings.max_stop)
        limit = settings.max_tokens_limit
        asked = request.requested_max_tokens if isinstance(request, V1ChatRequest) else request.max_tokens
        if limit is not None and asked is not None and asked > limit:
            raise _over("max_tokens", asked, limit)
    if isinstance(request, V1CompletionRequest) and isinstance(request.prompt, list):
        batch = sum(isinstance(item, str | list) for item in request.prompt)
        if batch > settings.max_prompts:
            raise _over("prompt", batch, settings.max_prompts)
    if isinstance(request, V1ChatRequest | V1CompletionRequest):
        logprobs = request.top_logprobs if isinstance(request, V1ChatRequest) else request.logprobs
        if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > settings.max_logprobs:
            raise _over("logprobs", logprobs, settings.max_logprobs)
    is_chat = isinstance(request, ChatRequest | RenderRequest | V1ChatRequest)
    messages = request.messages if is_chat else None  # type: ignore[union-attr]
    if messages is not None and len(messages) > settings.max_messages:
        raise _over("messages", len(messages), settings.max_messages)
    chars = prompt_chars(request)
    if chars > settings.max_prompt_chars:
        param = "messages" if messages is not None else "prompt"
        raise _over(f"{param} characters", chars, settings.max_prompt_chars)
