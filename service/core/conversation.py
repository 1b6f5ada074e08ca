"""Chat messages as vLLM hands them to a chat template: what the gateway renders is what the worker
renders, so the rules checked on the gateway's render hold for the worker's."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})


def messages_as_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validated chat messages (pydantic models) as plain dicts, every field they carry kept."""
    return [m.model_dump(exclude_none=True) for m in messages]


def conversation(messages: Sequence[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to a chat template (its "string" content format): text parts
    joined by newlines, no content as "", assistant tool-call arguments parsed into objects, and
    `developer` messages turned into one leading system message when the template has no such
    role. Other parts (images) are the worker's business; the gateway counts the text."""
    result = [_template_message(message) for message in messages]
    if any(m["role"] == "developer" for m in result) and not re.search(r"""["']developer["']""", template):
        result = _developer_as_system(result)
    return result


def decoded_arguments(arguments: str) -> Any:
    """Tool-call arguments as the worker decodes them (JSON), or None when they are not JSON; a
    nesting too deep to decode raises RecursionError."""
    if not arguments:
        return None
    try:
        return json.loads(arguments)
    except ValueError:
        return None


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text") or "" for part in content
                 if isinstance(part, dict) and part.get("type", "text") in TEXT_PART_TYPES]  # fmt: skip
        content = "\n".join(texts)
    result: dict[str, Any] = {"role": message["role"], "content": content or ""}
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            result[key] = message[key]
    if message["role"] == "assistant":
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            result["tool_calls"] = [_with_parsed_arguments(call) for call in calls]
        if message.get("reasoning") is not None:
            result["reasoning"] = result["reasoning_content"] = message["reasoning"]
    return result


def _with_parsed_arguments(call: Any) -> Any:
    """Templates expect tool-call arguments as an object; OpenAI clients send a JSON string (vLLM
    turns one that is not a JSON object into {})."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        parsed = decoded_arguments(arguments)
        arguments = parsed if isinstance(parsed, dict) else {}
    return {**call, "function": {**call["function"], "arguments": arguments or {}}}


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`developer` as `system`, and every system message merged into one at the start."""
    converted = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems in ([], [0]):
        return converted
    merged = "\n\n".join(m["content"] for m in converted if m["role"] == "system" and m["content"])
    return [{"role": "system", "content": merged}, *(m for m in converted if m["role"] != "system")]
