"""Turn a worker's /v1/completions answers into the native endpoints' shapes (the /v1 endpoints
pass the worker's own answers through).

Non-streamed: one function per endpoint. Streamed: a translator per endpoint whose `on_chunk`
maps one upstream chunk to zero or more outgoing events and whose `finish` adds the closing ones.
"""

from __future__ import annotations

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
