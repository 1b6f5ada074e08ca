"""A Responses request's input as the chat messages vLLM renders for it
(vllm/entrypoints/openai/responses/utils.py, `construct_input_messages`): the gateway renders them,
so its checks on the result run on what the worker renders. An item it cannot convert as vLLM does
is a 400 naming it, never forwarded unchecked."""

from __future__ import annotations

import json
from typing import Any

from service.errors import InvalidRequest

NAMESPACE_SEPARATOR = "__"  # vLLM's flat name of a namespaced tool: namespace__name


def responses_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages vLLM builds from `instructions` and `input` (plain text or items)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    converted: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        message = _from_item(item, converted[-1] if converted else None, f"input.{i}")
        if message is not None:
            converted.append(message)
    return [*messages, *converted]


def _from_item(item: dict[str, Any], previous: dict[str, Any] | None, at: str) -> dict[str, Any] | None:
    """A new message for `item`, or None when vLLM folds it into the previous assistant message."""
    kind = item.get("type")
    assistant = previous if previous is not None and previous.get("role") == "assistant" else None
    if kind in ("function_call", "custom_tool_call"):
        call = _tool_call(item, kind, at)
        if assistant is not None:
            assistant["tool_calls"] = [*(assistant.get("tool_calls") or []), call]
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        return _fold(assistant, "reasoning", _reasoning(item, at))
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant" and kind in (None, "message"):
        text = _assistant_text(item.get("content"), at)
        return dict(item) if text is None else _fold(assistant, "content", text)
    if "role" in item and kind in (None, "message"):
        return dict(item)
    raise InvalidRequest(
        f"{at} is a {kind!r} item, which this gateway cannot render as the worker would (it takes "
        "messages, function_call, custom_tool_call, their outputs and reasoning).",
        param=f"{at}.type",
    )


def _fold(assistant: dict[str, Any] | None, key: str, value: str) -> dict[str, Any] | None:
    """vLLM's merge: into the previous assistant message when it has no such field yet."""
    if assistant is not None and assistant.get(key) is None:
        assistant[key] = value
        return None
    return {"role": "assistant", key: value}


def _tool_call(item: dict[str, Any], kind: str, at: str) -> dict[str, Any]:
    fields = ("call_id", "name", "arguments") if kind == "function_call" else ("call_id", "name")
    for field in fields:
        if not isinstance(item.get(field), str):
            raise InvalidRequest(f"{at}.{field} must be a string.", param=f"{at}.{field}")
    name = item["name"]
    if kind == "function_call":
        if isinstance(item.get("namespace"), str) and item["namespace"]:
            name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
        arguments = item["arguments"]
    else:
        text = item.get("input") or ""
        if not isinstance(text, str):
            raise InvalidRequest(f"{at}.input must be a string.", param=f"{at}.input")
        arguments = json.dumps({"input": text}, ensure_ascii=False)
    return {"id": item["call_id"], "function": {"name": name, "arguments": arguments}, "type": "function"}


def _reasoning(item: dict[str, Any], at: str) -> str:
    """A reasoning item's text as vLLM takes it: its first content part, else its first summary."""
    if item.get("encrypted_content"):
        raise InvalidRequest("Encrypted reasoning content is not supported.", param=f"{at}.encrypted_content")
    summary = item.get("summary")
    if not isinstance(summary, list):
        raise InvalidRequest(f"{at}.summary must be a list.", param=f"{at}.summary")
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list) and parts:
            text = parts[0].get("text") if isinstance(parts[0], dict) else None
            if not isinstance(text, str):
                raise InvalidRequest(f"{at}.{key}.0.text must be a string.", param=f"{at}.{key}.0.text")
            return text
    return ""


def _assistant_text(content: Any, at: str) -> str | None:
    """An assistant item's text as vLLM takes it (a string, or its first part's text); None when it
    has none (the item is then rendered as a chat message)."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list) or not content:
        message = f"{at}.content must be text or a non-empty list of parts."
        raise InvalidRequest(message, param=f"{at}.content")
    first = content[0]
    if not isinstance(first, dict) or first.get("type") not in ("output_text", "input_text", None):
        raise InvalidRequest(
            f"{at}.content.0 must be an output_text part: the worker renders only an assistant item's "
            "first part's text.",
            param=f"{at}.content.0",
        )
    text = first.get("text")
    return text if isinstance(text, str) else None
