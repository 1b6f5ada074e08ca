"""Configurable caps on what one request may ask for, checked before any work is done.

The prompt-character budget counts every text the gateway would render or tokenize: the prompt (for
few-shot requests, the prompt that would be built; for scoring, with its continuation), every message
part, tool and document. Logprob caps count what the worker will return per token, however it is
asked for (`logprobs`, `top_logprobs`, `prompt_logprobs`, the ids of `logprob_token_ids`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from service.core.fewshot import few_shot_length
from service.core.protocol import (
    CompleteRequest,
    DetokenizeRequest,
    Passthrough,
    TokenizeRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
)
from service.errors import InvalidRequest
from service.ops.settings import Settings


def _over(param: str, asked: int, cap: int) -> InvalidRequest:
    return InvalidRequest(f"{param} is {asked:,}; this gateway allows at most {cap:,}.", param=param)


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


@dataclass(frozen=True)
class CountedText:
    """What the prompt-character budget counted in a request: the field a refusal names, how the
    message names what was counted, and how many characters."""

    param: str
    what: str
    chars: int


def prompt_chars(request: BaseModel) -> CountedText:
    """The text of a request to render or tokenize, counted in characters."""
    if isinstance(request, CompleteRequest):
        chars, param, what = len(request.prompt), "prompt", "The prompt"
        if request.examples:
            chars = few_shot_length(request.prompt, request.examples, request.layout)
            param, what = "examples", "The few-shot prompt built from `prompt` and `examples`"
        if request.continuation is not None:  # scored text is tokenized with the prompt
            return CountedText("continuation", f"{what} with the continuation to score",
                               chars + len(request.continuation))  # fmt: skip
        return CountedText(param, what, chars)
    if isinstance(request, V1CompletionRequest):
        return CountedText("prompt", "The prompt text", sum(map(len, prompt_texts(request))))
    if isinstance(request, V1ResponsesRequest):
        chars = text_chars(request.input) + len(request.instructions or "")
        return CountedText("input", "The input and instructions", chars)
    if isinstance(request, TokenizeRequest) and request.messages is None:
        return CountedText("prompt", "The prompt", len(request.prompt or ""))
    extra = 0
    if isinstance(request, V1ChatRequest | V1BatchChatRequest | TokenizeRequest):
        extra = text_chars(request.tools) + text_chars(request.documents)
        extra += len(request.chat_template or "") + text_chars(request.chat_template_kwargs)  # rendered too
    chars = text_chars(_field(request, "messages")) + extra
    return CountedText("messages", "The conversation's text (with its tools, documents and template)", chars)


def prompt_texts(request: V1CompletionRequest) -> list[str]:
    """The texts among a completion request's prompts (a list of them is of one kind: its first
    item says which, so a list of two million ids is not walked)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    return prompt if prompt and isinstance(prompt[0], str) else []


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
    return requested_field(request)[1]


def requested_field(request: BaseModel) -> tuple[str, int | None]:
    """The field that says how many tokens to generate (the one sent), and its value."""
    for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        value = _field(request, name)
        if isinstance(value, int):
            return name, value
    return "max_tokens", None


def sequences_per_prompt(request: BaseModel) -> int:
    """`n`: vLLM fans a prompt out into that many engine requests, each computing everything the
    prompt costs (its prompt logprobs too)."""
    n = _field(request, "n")
    return n if isinstance(n, int) and n > 1 else 1


def prompt_logprobs_source(request: BaseModel) -> str | None:
    """The field that makes the worker compute prompt logprobs (a logit for every vocabulary entry at
    every prompt position), or None. vLLM's rule (`to_sampling_params`): `prompt_logprobs` if set, else
    with `echo` the number of logprobs asked (completions: `logprobs`, none if unset; chat:
    `top_logprobs`, which defaults to 0, so chat `echo` alone asks for them)."""
    if isinstance(request, CompleteRequest):
        return "continuation" if request.continuation is not None else None
    if _field(request, "prompt_logprobs") is not None:
        return "prompt_logprobs"
    if not _field(request, "echo"):
        return None
    if isinstance(request, V1CompletionRequest):
        return "echo" if request.logprobs is not None else None
    return "echo" if isinstance(request, V1ChatRequest | V1BatchChatRequest) else None


def enforce_caps(request: BaseModel, settings: Settings) -> None:
    """Raise a 400 naming the field when the request asks for more than the configured caps."""
    if isinstance(request, DetokenizeRequest):
        if len(request.tokens) > settings.max_detokenize_tokens:
            raise _over("tokens", len(request.tokens), settings.max_detokenize_tokens)
        return
    n = _field(request, "n")
    if isinstance(n, int) and n > settings.max_n:
        raise _over("n", n, settings.max_n)
    stop = _field(request, "stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > settings.max_stop:
        raise _over("stop", len(stops), settings.max_stop)
    field, asked = requested_field(request)
    limit = settings.max_tokens_limit
    if limit is not None and isinstance(asked, int) and asked > limit:
        raise _over(field, asked, limit)
    _logprob_caps(request, settings.max_logprobs)
    prompt = request.prompt if isinstance(request, V1CompletionRequest) else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # texts or id lists: a batch
        batch = len(prompt)
        if batch > settings.max_prompts:
            raise _over("prompt", batch, settings.max_prompts)
    chats = conversations(request)
    if len(chats) > settings.max_prompts:
        raise _over("messages", len(chats), settings.max_prompts)
    longest = max((len(chat) for chat in chats), default=0)
    if longest > settings.max_messages:
        raise _over("messages", longest, settings.max_messages)
    size = request.body_bytes if isinstance(request, Passthrough) else None
    if size is not None and size <= settings.max_prompt_chars:
        return  # every character of its text took at least a byte of the body: no need to walk it
    counted = prompt_chars(request)
    if counted.chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"{counted.what} is {counted.chars:,} characters; this gateway allows at most "
            f"{settings.max_prompt_chars:,}.",
            param=counted.param,
        )


def _logprob_caps(request: BaseModel, cap: int) -> None:
    asked: Iterable[tuple[str, Any]] = (
        ("logprobs", _field(request, "logprobs")),
        ("top_logprobs", _field(request, "top_logprobs")),
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
    ids = (request.model_extra or {}).get("logprob_token_ids")
    if isinstance(ids, list) and len(ids) > cap:  # vLLM returns a logprob per listed id, per token
        raise InvalidRequest(
            f"logprob_token_ids lists {len(ids)} ids, a logprob each for every generated token; this gateway "
            f"allows at most {cap} logprobs per token.",
            param="logprob_token_ids",
        )
