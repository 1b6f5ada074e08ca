"""Configurable caps on what one request may ask for, checked before any work is done.

The prompt-character budget counts every text the gateway would render or tokenize: the prompt (for
few-shot requests, the prompt that would be built), every message part, tool and document.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from service.core.fewshot import few_shot_length
from service.core.protocol import (
    CompleteRequest,
    TokenizeRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
)
from service.errors import InvalidRequest
from service.ops.settings import Settings


def _over(param: str, asked: int, cap: int) -> InvalidRequest:
    return InvalidRequest(f"{param} is {asked}; this gateway allows at most {cap}.", param=param)


def text_chars(value: Any) -> int:
    """Characters of every string inside `value` (messages, parts, tools, documents...)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, BaseModel):
        return text_chars(value.__dict__) + text_chars(value.model_extra or {})
    if isinstance(value, dict):
        return sum(text_chars(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(text_chars(item) for item in value)
    return 0


def prompt_chars(request: BaseModel) -> tuple[str, int]:
    """Which input is counted, and its characters of text to render or tokenize."""
    if isinstance(request, CompleteRequest):
        if not request.examples:
            return "prompt", len(request.prompt)
        return "prompt", few_shot_length(request.prompt, request.examples, request.layout)
    if isinstance(request, V1CompletionRequest):
        return "prompt", text_chars(request.prompt)
    if isinstance(request, V1ResponsesRequest):
        return "input", text_chars(request.input) + len(request.instructions or "")
    if isinstance(request, TokenizeRequest) and request.messages is None:
        return "prompt", len(request.prompt or "")
    extra = 0
    if isinstance(request, V1ChatRequest | V1BatchChatRequest | TokenizeRequest):
        extra = text_chars(request.tools) + text_chars(request.documents)
        extra += len(request.chat_template or "") + text_chars(request.chat_template_kwargs)  # rendered too
    return "messages", text_chars(_field(request, "messages")) + extra


def conversations(request: BaseModel) -> list[Any]:
    """The conversations a chat request holds (a batch holds several)."""
    if isinstance(request, V1BatchChatRequest):
        return list(request.messages)
    messages = _field(request, "messages")
    return [messages] if messages is not None else []


def _field(request: BaseModel, name: str) -> Any:
    """A declared field's value, or None (no pydantic `__getattr__` miss: this runs per request)."""
    return request.__dict__.get(name)


def requested_tokens(request: BaseModel) -> int | None:
    """How many tokens the request asks to generate, whatever the field is called."""
    for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        value = _field(request, name)
        if isinstance(value, int):
            return value
    return None


def enforce_caps(request: BaseModel, settings: Settings) -> None:
    """Raise a 400 naming the field when the request asks for more than the configured caps."""
    n = _field(request, "n")
    if isinstance(n, int) and n > settings.max_n:
        raise _over("n", n, settings.max_n)
    stop = _field(request, "stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > settings.max_stop:
        raise _over("stop", len(stops), settings.max_stop)
    asked = requested_tokens(request)
    limit = settings.max_tokens_limit
    if limit is not None and isinstance(asked, int) and asked > limit:
        raise _over("max_tokens", asked, limit)
    _logprob_caps(request, settings.max_logprobs)
    if isinstance(request, V1CompletionRequest) and isinstance(request.prompt, list):
        batch = sum(isinstance(item, str | list) for item in request.prompt)
        if batch > settings.max_prompts:
            raise _over("prompt", batch, settings.max_prompts)
    chats = conversations(request)
    if len(chats) > settings.max_prompts:
        raise _over("messages", len(chats), settings.max_prompts)
    longest = max((len(chat) for chat in chats), default=0)
    if longest > settings.max_messages:
        raise _over("messages", longest, settings.max_messages)
    counted, chars = prompt_chars(request)
    if chars > settings.max_prompt_chars:
        raise _over(f"{counted} characters", chars, settings.max_prompt_chars)


def _logprob_caps(request: BaseModel, cap: int) -> None:
    asked: Iterable[tuple[str, Any]] = (
        ("logprobs", _field(request, "logprobs")),
        ("logprobs", _field(request, "top_logprobs")),
        ("prompt_logprobs", _field(request, "prompt_logprobs")),
    )
    for param, value in asked:
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == -1 and param == "prompt_logprobs":  # -1: every vocabulary entry at every position
            raise InvalidRequest(
                f"prompt_logprobs of -1 asks for the whole vocabulary at every position; this gateway "
                f"allows at most {cap}.",
                param=param,
            )
        if value > cap:
            raise _over(param, value, cap)
