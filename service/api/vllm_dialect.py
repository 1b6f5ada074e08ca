"""vLLM's words for what vLLM itself refuses, on vLLM's routes (/v1, /tokenize, /detokenize).

The rule: a request vLLM would refuse gets vLLM's answer, so a client that works against vLLM (and
matches on its messages) works here. Most such requests simply reach the worker, which refuses them
itself (the gateway declares only the fields it reads, without vLLM's range checks). What the gateway
must refuse before a worker sees it is answered as vLLM answers it:

- a field the gateway reads, of the wrong type: vLLM's validation message ("1 validation error: {...}",
  `type` "Bad Request", `param` "body.<field>", `code` 400), built the way vLLM's handler builds it;
- an unknown model: vLLM's 404 (`NotFoundError`).

Rules of the gateway's own (caps, budgets, the control-token rule, unknown fields, a body that is not a
JSON object) keep the gateway's envelope: vLLM has no such rule to match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from service.core.protocol import GATEWAY_RULE
from service.errors import GatewayError, ModelNotFound, VllmRefusal, invalid_request

# What vLLM's validation handler reports at most, and how much of each value (its own bounds).
MOST_ERRORS = 10
MOST_INPUT_CHARS = 200
MOST_ERROR_CHARS = 1000
# pydantic's names of validators and union members in an error's location: not fields.
_BRACKETED = re.compile(r"[\[\]{}()]")
_MARKERS = frozenset({
    "function-wrap", "function-after", "function-before", "function-plain", "json-or-python",
    "lax-or-strict", "chain", "default", "nullable", "tagged-union", "union", "call", "arguments",
    "is-instance", "is-subclass", "callable", "str", "int", "float", "bool", "bytes", "bytearray", "list",
    "tuple", "dict", "set", "frozenset", "complex", "none", "nonetype",
})  # fmt: skip
# The endpoint table's tags of the routes vLLM serves too.
VLLM_TAGS = frozenset({"openai", "tokenizer"})
# pydantic words a type error on JSON input in JSON's terms; vLLM validates Python objects.
_PYTHON_WORDS = {"Input should be a valid array": "Input should be a valid list",
                 "Input should be an object": "Input should be a valid dictionary"}  # fmt: skip
# Problems with the body as a whole (not JSON, not an object): the gateway's words.
_BODY_PROBLEMS = frozenset({"json_invalid", "model_attributes_type", "model_type", "dict_type"})


def validation_error(errors: Sequence[Any], body: bytes = b"") -> GatewayError:
    """A /v1 request that failed validation: a rule of the gateway's own in the gateway's envelope,
    anything else as vLLM's validation handler words it."""
    own = [error for error in errors if error.get("type") == GATEWAY_RULE]
    first = errors[0] if errors else {}
    python = _as_python_json_error(body) if first.get("type") == "json_invalid" and not own else None
    if python is not None:
        errors = [python]  # vLLM's JSON parser is Python's: its words and position
    elif own or not errors or (first.get("type") in _BODY_PROBLEMS and not _fields(first.get("loc", ()))):
        return invalid_request(own or errors)
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = "".join(f"  {_line(error)}\n" for error in errors[:MOST_ERRORS])
    if count > MOST_ERRORS:
        lines += f"  ...and {count - MOST_ERRORS} more {label}\n"
    message = f"{count} validation {label}:\n{lines}".rstrip()
    return VllmRefusal(400, "Bad Request", message, param=_param(errors[0].get("loc", ())))


def in_vllm_words(error: Exception) -> Exception:
    """An error the gateway raised for an input vLLM refuses too, as vLLM answers it; others as they are."""
    if isinstance(error, ModelNotFound):  # vLLM names the names it serves: here, all the gateway's
        message = f"The model `{error.model}` does not exist. Valid aliases: {', '.join(error.known)}."
        return VllmRefusal(404, "NotFoundError", message, param="model")
    return error


def _as_python_json_error(body: bytes) -> dict[str, Any] | None:
    """A body that is not JSON, as FastAPI's parse (Python's json module) reports it; None where that
    parse has no such words (it accepts a lone surrogate; nesting too deep or bytes that are not text
    fail otherwise): the gateway's own words then."""
    import json

    try:
        json.loads(body)
    except json.JSONDecodeError as exc:
        return {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
                "ctx": {"error": exc.msg}}  # fmt: skip
    except (ValueError, RecursionError):
        return None
    return None


def _fields(loc: Sequence[Any]) -> list[str]:
    """An error location's parts that name fields or positions, under `body` as FastAPI puts them."""
    parts = [str(part) for part in loc]
    return [part for part in parts if not _BRACKETED.search(part) and part.lower() not in _MARKERS]


def _param(loc: Sequence[Any]) -> str:
    parts = _fields(loc)
    return ".".join(parts if parts[:1] == ["body"] else ["body", *parts])


def _line(error: Any) -> str:
    """One error as vLLM's handler prints it: pydantic's dict, its location cleaned, its input bounded."""
    shown = dict(error)
    if "input" in shown:
        shown["input"] = _bounded(shown["input"])
    shown["loc"] = _param(error.get("loc", ()))
    shown["msg"] = _PYTHON_WORDS.get(str(shown.get("msg")), shown.get("msg"))
    text = str(shown)
    return text if len(text) <= MOST_ERROR_CHARS else text[:MOST_ERROR_CHARS] + "...[truncated]"


def _bounded(value: Any) -> Any:
    """A value as vLLM's handler shows it: text cut at 200 characters, containers by their size."""
    if isinstance(value, str):
        return value if len(value) <= MOST_INPUT_CHARS else value[:MOST_INPUT_CHARS] + "...[truncated]"
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = str(value)
    except ValueError:  # an integer past Python's digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= MOST_INPUT_CHARS else text[:MOST_INPUT_CHARS] + "...[truncated]"
