"""The direct path (service.fastroutes) must answer exactly as FastAPI would. `/chat/render` is still
served by FastAPI (it returns a dict for its response_model) and validates `messages` with the same
models as `/chat` and `/v1/chat/completions`, which take the direct path: the same bad input must get
the same status and envelope from both."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from service.fastroutes import direct_routes

BAD_BODIES = [
    (b"", "application/json"),
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'"text"', "application/json"),
    (b"\xff\xfe\x00", "application/json"),
    (b'{"model": "chat", "messages": []}', "application/json"),
    (b'{"model": "chat", "messages": [{"role": "robot", "content": "hi"}]}', "application/json"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "application/json"),
    (b'{"model": "chat", "messages": [{"role": "user"}]}', "application/json"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}', "application/json"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', ""),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', "application/json"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "hi"}]}', "application/json"),
]


def test_generation_routes_take_the_direct_path(gateway_app: FastAPI) -> None:
    routes = direct_routes(gateway_app)
    assert set(routes) == {"/complete", "/chat", "/v1/completions", "/v1/chat/completions"}
    assert "/chat/render" not in routes  # returns a dict: FastAPI applies its response_model


@pytest.mark.parametrize(("raw", "content_type"), BAD_BODIES)
async def test_direct_path_errors_match_fastapi(
    http: httpx.AsyncClient, raw: bytes, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    by_fastapi = await http.post("/chat/render", content=raw, headers=headers)
    direct = await http.post("/chat", content=raw, headers=headers)
    assert by_fastapi.status_code >= 400
    assert (direct.status_code, direct.json()) == (by_fastapi.status_code, by_fastapi.json())
    assert set(direct.json()["error"]) == {"message", "type", "param", "code"}


async def test_direct_path_counts_failures_like_fastapi(http: httpx.AsyncClient) -> None:
    """A refused request on the direct path is still counted and logged as a failed request."""
    before = (await http.get("/metrics")).text
    response = await http.post("/v1/completions", json={"model": "base", "prompt": "hi", "n": "many"})
    assert response.status_code == 400
    after = (await http.get("/metrics")).text
    line = 'gateway_errors_total{endpoint="v1_completions",type="invalid_request_error"}'

    def count(text: str) -> float:
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    assert count(after) == count(before) + 1
