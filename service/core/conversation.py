"""Chat messages as vLLM hands them to a chat template: what the gateway renders is what the worker
renders, so the rules checked on the gateway's render hold for the worker's."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from service.errors import InvalidRequest

# The content parts vLLM renders as text (vllm/renderers/chat_utils.py, MM_PARSER_MAP), each from its
# own field; vLLM skips a part whose text is empty or missing.
TEXT_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking", "tool_reference": "name"}  # fmt: skip
TEXT_PART_TYPES = frozenset(TEXT_FIELDS)
# Parts vLLM takes as media (placeholders the gateway cannot render): by type or by key.
MEDIA_KEYS = ("image_url", "input_image", "image_pil", "image_embeds", "audio_embeds", "video_embeds",
              "prompt_embeds", "audio_url", "input_audio", "video_url")  # fmt: skip
BILLING_HEADER = "x-anthropic-billing-header"  # a system text line vLLM drops (Claude Code's header)


def messages_as_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validated chat messages (pydantic models) as plain dicts, every field they carry kept."""
    return [m.model_dump(exclude_none=True) for m in messages]


def conversation(
    messages: Sequence[dict[str, Any]], template: str, param: str = "messages"
) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to a chat template (its "string" content format): text parts
    joined by newlines, each from its own field, no content as "", assistant tool-call arguments
    parsed into objects, and `developer` messages turned into one leading system message when the
    template has no such role. A part vLLM would not render as text (media, unknown types) is a
    400: the gateway could not check what the worker renders of it."""
    result = [_template_message(message, f"{param}.{i}") for i, message in enumerate(messages)]
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


def _template_message(message: dict[str, Any], at: str) -> dict[str, Any]:
    role = message["role"]
    content = message.get("content")
    parts = [] if content is None else [content] if isinstance(content, str) else list(content)
    if role == "system":
        parts = _without_billing_header(parts)
    texts = [_part_text(part, f"{at}.content.{j}") for j, part in enumerate(parts)]
    result: dict[str, Any] = {"role": role, "content": "\n".join(text for text in texts if text)}
    if role == "assistant":
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            result["tool_calls"] = [_with_parsed_arguments(call) for call in calls]
        if message.get("reasoning") is not None:
            result["reasoning"] = result["reasoning_content"] = message["reasoning"]
    elif role == "tool" and "tool_call_id" in message:
        result["tool_call_id"] = message["tool_call_id"]
    for key in ("name", "task"):
        if isinstance(message.get(key), str):
            result[key] = message[key]
    if role == "developer":
        result["tools"] = message.get("tools")
    return result


def _part_text(part: Any, at: str) -> str | None:
    """A content part's text as vLLM's parser takes it (None: nothing rendered)."""
    if isinstance(part, str):
        return part
    kind, uuid = part.get("type"), part.get("uuid")
    if kind is None or uuid is not None:  # vLLM goes by the part's keys then
        if any(key in part for key in MEDIA_KEYS):
            kind = "image_url"
        elif "tool_reference" in part:
            kind = "tool_reference"
        else:
            message = f'The content part {at} has no `type` (such as "text").'
            raise InvalidRequest(message, param=f"{at}.type")
    if kind not in TEXT_FIELDS:
        raise InvalidRequest(
            f"{at} is a {kind!r} part: this gateway serves text parts only ({', '.join(TEXT_FIELDS)}), "
            "which it renders exactly as the worker does before sending them.",
            param=f"{at}.type",
        )
    text = part.get(TEXT_FIELDS[kind])
    if text is not None and not isinstance(text, str):
        raise InvalidRequest(f"{at}.{TEXT_FIELDS[kind]} must be a string.", param=f"{at}.{TEXT_FIELDS[kind]}")
    return text


def _without_billing_header(parts: list[Any]) -> list[Any]:
    """System text parts without a leading billing-header line, as vLLM drops it."""
    kept: list[Any] = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if part.get("type") == "text" else None
        if not (isinstance(text, str) and text.startswith(BILLING_HEADER)):
            kept.append(part)
        elif rest := text.partition("\n")[2]:
            kept.append(rest if isinstance(part, str) else {**part, "text": rest})
    return kept


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
