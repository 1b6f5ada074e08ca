"""Turn a worker's /v1/completions answers into each endpoint's shape.

Non-streamed: one function per endpoint. Streamed: a translator per endpoint whose `on_chunk`
maps one upstream chunk to zero or more outgoing events and whose `finish` adds the closing ones.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Protocol

EMPTY_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _usage(data: dict[str, Any]) -> dict[str, int]:
    usage = data.get("usage") or EMPTY_USAGE
    return {key: int(usage.get(key) or 0) for key in EMPTY_USAGE}


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(data.get("choices") or [], key=lambda choice: int(choice.get("index", 0)))


def _prompt_token_ids(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices") or [{}]
    ids = choices[0].get("prompt_token_ids")
    return {"prompt_token_ids": ids} if ids is not None else {}


def native_complete(data: dict[str, Any], model: str) -> dict[str, Any]:
    """/complete answer: the first completion's text on top, all of them in `choices`."""
    choices = [
        {"index": c.get("index", 0), "text": c.get("text", ""), "finish_reason": c.get("finish_reason")}
        for c in _choices(data)
    ]
    first = choices[0] if choices else {"text": "", "finish_reason": None}
    return {
        "id": data.get("id", ""),
        "model": model,
        "text": first["text"],
        "finish_reason": first["finish_reason"],
        "usage": _usage(data),
        "choices": choices,
        **_prompt_token_ids(data),
    }


def native_chat(data: dict[str, Any], model: str) -> dict[str, Any]:
    """/chat answer: the assistant's reply on top, all replies in `choices`."""
    choices = [
        {
            "index": c.get("index", 0),
            "message": {"role": "assistant", "content": c.get("text", "")},
            "finish_reason": c.get("finish_reason"),
        }
        for c in _choices(data)
    ]
    first = (
        choices[0] if choices else {"message": {"role": "assistant", "content": ""}, "finish_reason": None}
    )
    return {
        "id": data.get("id", ""),
        "model": model,
        "message": first["message"],
        "finish_reason": first["finish_reason"],
        "usage": _usage(data),
        "choices": choices,
        **_prompt_token_ids(data),
    }


def _token_logprob(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(logprobs: dict[str, Any] | None, top: int) -> dict[str, Any] | None:
    """Completion-style logprobs (parallel lists) as chat-style (one entry per token)."""
    if not logprobs:
        return None
    rows = itertools.zip_longest(
        logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], logprobs.get("top_logprobs") or []
    )
    content = []
    for token, logprob, alternatives in rows:
        if token is None:
            break
        ranked = sorted((alternatives or {}).items(), key=lambda item: -item[1])[:top]
        content.append(
            {**_token_logprob(token, logprob), "top_logprobs": [_token_logprob(*alt) for alt in ranked]}
        )
    return {"content": content}


def openai_chat(data: dict[str, Any], model: str, top_logprobs: int) -> dict[str, Any]:
    """/v1/chat/completions answer built from a completion answer."""
    return {
        "id": "chatcmpl-" + str(data.get("id", "")).removeprefix("cmpl-"),
        "object": "chat.completion",
        "created": data.get("created", int(time.time())),
        "model": model,
        "choices": [
            {
                "index": c.get("index", 0),
                "message": {"role": "assistant", "content": c.get("text", "")},
                "logprobs": chat_logprobs(c.get("logprobs"), top_logprobs),
                "finish_reason": c.get("finish_reason"),
            }
            for c in _choices(data)
        ],
        "usage": _usage(data),
    }


class StreamTranslator(Protocol):
    def on_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...


class NativeStream:
    """Native streams: `{"index", "text"|"delta"}` events, then one with `finish_reason` and `usage`."""

    def __init__(self, model: str, field: str) -> None:
        self.model = model
        self.field = field
        self.id = ""
        self.usage: dict[str, int] = dict(EMPTY_USAGE)
        self.finish_reasons: dict[int, str | None] = {}

    def on_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.id = chunk.get("id", self.id)
        if chunk.get("usage"):
            self.usage = _usage(chunk)
        events = []
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            event: dict[str, Any] = {"index": index, self.field: choice.get("text", "")}
            if choice.get("finish_reason") is not None:
                self.finish_reasons[index] = choice["finish_reason"]
                event["finish_reason"] = choice["finish_reason"]
            events.append(event)
        return events

    def finish(self) -> list[dict[str, Any]]:
        return [
            {
                "id": self.id,
                "model": self.model,
                "finish_reason": self.finish_reasons.get(0),
                "usage": self.usage,
            }
        ]


class OpenAIChatStream:
    """chat.completion.chunk events: a role delta first per choice, content deltas, finish, usage."""

    def __init__(self, model: str, include_usage: bool, top_logprobs: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.top_logprobs = top_logprobs
        self.created = int(time.time())
        self.id = ""
        self.started: set[int] = set()
        self.usage: dict[str, int] | None = None

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def on_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.id = self.id or "chatcmpl-" + str(chunk.get("id", "")).removeprefix("cmpl-")
        if chunk.get("usage"):
            self.usage = _usage(chunk)
        events = []
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            if index not in self.started:
                self.started.add(index)
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                events.append(self._chunk([{**role, "finish_reason": None}]))
            delta = {"content": choice["text"]} if choice.get("text") else {}
            out = {
                "index": index,
                "delta": delta,
                "logprobs": chat_logprobs(choice.get("logprobs"), self.top_logprobs),
                "finish_reason": choice.get("finish_reason"),
            }
            if delta or out["finish_reason"] is not None:
                events.append(self._chunk([out]))
        return events

    def finish(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self._chunk([]), "usage": self.usage or dict(EMPTY_USAGE)}]
