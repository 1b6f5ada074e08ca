"""What parsing a body may cost is counted before it: arrays and objects outside strings, in linear
time whatever the body holds."""

from __future__ import annotations

import json
import time

import pytest

from service.api.dispatch import json_containers, parse_body
from service.core.protocol import V1CompletionRequest
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
