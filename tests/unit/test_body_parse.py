"""What parsing a body may cost is counted before it: arrays and objects outside strings, in linear
time whatever the body holds; and what validating it costs stays bounded: every list and object stops
at its first bad item, and errors are never all described."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from service.api.dispatch import json_containers, parse_body
from service.api.endpoint import Endpoint
from service.api.endpoints import ENDPOINTS
from service.core.protocol import (
    ChatRequest,
    CompleteRequest,
    TokenizeRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
)
from service.errors import InvalidRequest

JSON = b"application/json"


@pytest.mark.parametrize(
    ("value", "containers"),
    [
        ({"a": [1, {"b": []}]}, 4),
        ({"text": '[{ [{ " [ \\ {', "more": ["\\", '\\"[', "]"]}, 2),  # brackets in strings, escapes
        ([[]] * 50, 51),
    ],
)
def test_containers_outside_strings_are_counted(value: object, containers: int) -> None:
    body = json.dumps(value).encode()
    assert json_containers(body, limit=0) == containers  # the exact count, strings excluded
    assert json_containers(body, limit=10_000) >= containers  # within the cap, a cheap upper bound


def test_the_count_is_linear_even_for_unterminated_strings() -> None:
    # A regex for JSON strings backtracks over an unterminated one from every quote: quadratic
    # (a 40 KB body like this took 4.7 s). The count must not care.
    started = time.monotonic()
    for body in (b"[" * 100 + b'"' + b'\\"' * 200_000, b"[" * 100 + b'"' * 400_000):
        assert json_containers(body, limit=10) == 100
    assert time.monotonic() - started < 2


async def test_a_body_over_the_container_cap_is_refused_before_parsing() -> None:
    body = json.dumps({"prompt": [[1]] * 100}).encode()
    with pytest.raises(InvalidRequest) as caught:
        await parse_body(V1CompletionRequest, body, JSON, max_containers=100)
    assert caught.value.code == "too_many_json_containers" and "102" in caught.value.message
    text = json.dumps({"prompt": "[" * 1000}).encode()
    assert (await parse_body(V1CompletionRequest, text, JSON, max_containers=100)).prompt == "[" * 1000


async def test_a_large_body_is_parsed_as_a_small_one_is() -> None:
    ids = list(range(200_000))  # over 64 KiB: validated in a thread
    request = await parse_body(V1CompletionRequest, json.dumps({"prompt": ids}).encode(), JSON)
    assert request.prompt == ids and request.body_bytes > 64 * 1024
    with pytest.raises(InvalidRequest, match="prompt"):
        await parse_body(V1CompletionRequest, json.dumps({"prompt": [-1] * 200_000}).encode(), JSON)


COLLECTIONS = frozenset({"list", "tuple", "set", "frozenset", "dict", "generator", "deque"})


def collections_in(schema: object, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every list, tuple, set or dict schema inside a pydantic core schema, with the fields it is in."""
    if isinstance(schema, dict):
        kind = schema.get("type")
        if isinstance(kind, str) and kind in COLLECTIONS:
            yield path, schema
        fields = schema.get("fields") if kind == "model-fields" else None
        for key, value in (fields if isinstance(fields, dict) else schema).items():
            yield from collections_in(value, f"{path}.{key}" if fields is not None else path)
    elif isinstance(schema, list):
        for item in schema:
            yield from collections_in(item, path)


def cannot_fail(schema: dict[str, Any]) -> bool:
    """A JSON object taken as it is (string keys, any values): no item of it can be wrong."""
    keys, values = schema.get("keys_schema"), schema.get("values_schema")
    return schema["type"] == "dict" and keys == {"type": "str"} and values in (None, {"type": "any"})


def test_the_walk_finds_the_collections_of_a_body() -> None:
    """The check below is only as good as the walk: it must see a chat body's lists and objects."""
    chat = next(e for e in ENDPOINTS if e.path == "/v1/chat/completions")
    assert chat.body is not None
    found = {path for path, _ in collections_in(chat.body.__pydantic_core_schema__)}
    assert {".messages", ".tools"} <= found, found


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.body is not None], ids=lambda e: e.path)
def test_every_list_and_object_of_every_body_stops_at_its_first_bad_item(endpoint: Endpoint) -> None:
    """A 4 MiB body holds two million one-byte items: one validation error each was 7-22 s of
    stalled loop and gigabytes, so every collection a body may hold, present or future, fails fast."""
    assert endpoint.body is not None
    found = list(collections_in(endpoint.body.__pydantic_core_schema__))
    slow = [path for path, schema in found if not (schema.get("fail_fast") or cannot_fail(schema))]
    assert slow == [], f"{endpoint.path}: collections without fail_fast: {slow}"


def wrong_items(count: int) -> bytes:
    return b"[" + b",".join([b"1"] * count) + b"]"


@pytest.mark.parametrize(
    ("model", "head", "tail"),
    [
        (CompleteRequest, b'{"prompt":"a","stop":', b"}"),
        (ChatRequest, b'{"messages":[{"role":"user","content":', b"}]}"),
        (V1CompletionRequest, b'{"prompt":"a","stop":', b"}"),
        (V1ChatRequest, b'{"messages":[{"role":"user","content":', b"}]}"),
        (V1ChatRequest, b'{"messages":[{"role":"user","content":"hi"}],"tools":', b"}"),
        (V1ChatRequest, b'{"messages":[{"role":"user","content":"hi"}],"documents":', b"}"),
        (V1BatchChatRequest, b'{"messages":[', b"]}"),
        (V1ResponsesRequest, b'{"input":', b"}"),
        (TokenizeRequest, b'{"messages":[{"role":"user","content":"hi"}],"tools":', b"}"),
    ],
)
async def test_a_long_array_of_the_wrong_type_is_one_problem(
    model: type[Any], head: bytes, tail: bytes
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await parse_body(model, head + wrong_items(200_000) + tail, JSON)
    assert "more problem" not in caught.value.message or "(1 more problem(s))" in caught.value.message, (
        caught.value.message
    )


async def test_many_unknown_fields_are_counted_not_described_one_by_one() -> None:
    """A strict model reports every unknown field: describing 290,000 of them (a dict each) took
    seconds on the loop; they are counted instead, and a few are still named."""
    body = json.dumps({"prompt": "a", **{f"x{i}": 1 for i in range(290_000)}}).encode()
    started = time.perf_counter()
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate_json(body)
    validating = time.perf_counter() - started
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as caught:
        await parse_body(CompleteRequest, body, JSON)
    parsing = time.perf_counter() - started
    assert "290,000 problems" in caught.value.message
    assert parsing < 3 * validating + 0.05, (parsing, validating)  # describing them all took 5-9x
    few = json.dumps({"prompt": "a", "tempreature": 1}).encode()
    with pytest.raises(InvalidRequest) as caught:
        await parse_body(CompleteRequest, few, JSON)
    assert caught.value.param == "tempreature" and "Unrecognized" in caught.value.message
