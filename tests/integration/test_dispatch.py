"""The dispatcher serves every POST endpoint of the table: bad input of any kind is a 400 envelope
with a message a person understands (no validator names, no echo of the input), on every route."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI

from service.api.endpoint import admin_paths, post_endpoints
from service.api.endpoints import ENDPOINTS
from service.api.vllm_dialect import VLLM_TAGS
from tests.integration.conftest import ADMIN_KEY

POST_PATHS = sorted(post_endpoints(ENDPOINTS))
OPERATOR = admin_paths(ENDPOINTS)
# Routes vLLM serves too: a body vLLM's parser refuses gets vLLM's words (tests/e2e/test_vllm_parity.py).
VLLM_PATHS = {path for path, endpoint in post_endpoints(ENDPOINTS).items() if endpoint.tag in VLLM_TAGS}


def admin_for(path: str) -> dict[str, str]:
    """An operator route's bad body reaches the dispatcher only with an admin key."""
    return {"authorization": f"Bearer {ADMIN_KEY}"} if path in OPERATOR else {}


PYDANTIC_INTERNALS = re.compile(r"function-(after|before|wrap|plain)|\[|model_attributes_type|json_invalid")

BAD_BODIES = [
    (b"", "application/json", "no body"),
    (b"{not json", "application/json", "not valid JSON"),
    (b"[1, 2]", "application/json", "must be a JSON object"),
    (b'"text"', "application/json", "must be a JSON object"),
    (b"\xff\xfe\x00", "application/json", "not valid JSON"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "application/json",
     "surrogate"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', "text/plain", "Content-Type"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', "", "Content-Type"),
]  # fmt: skip


def test_every_post_endpoint_is_dispatched_and_documented(gateway_app: FastAPI) -> None:
    schema = gateway_app.openapi()
    for path in POST_PATHS:
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert operation["responses"]["400"]["content"]["application/json"]


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize(("raw", "content_type", "says"), BAD_BODIES)
async def test_bad_bodies_get_a_clear_400_on_every_route(
    http: httpx.AsyncClient, path: str, raw: bytes, content_type: str, says: str
) -> None:
    headers = {"content-type": content_type, **admin_for(path)} if content_type else admin_for(path)
    response = await http.post(path, content=raw, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if raw == b"{not json" and path in VLLM_PATHS:  # as vLLM words it, the position of the bad character
        assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.1", 400)
        assert "'msg': 'JSON decode error'" in error["message"], error["message"]
        return
    assert says in error["message"]
    assert not PYDANTIC_INTERNALS.search(error["message"]), error["message"]


@pytest.mark.parametrize("path", POST_PATHS)
async def test_json_nested_2000_deep_is_a_400_not_a_500(http: httpx.AsyncClient, path: str) -> None:
    deep = b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b', "messages": []}'
    response = await http.post(
        path, content=deep, headers={"content-type": "application/json", **admin_for(path)}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "The request body is nested too deeply to be parsed."


async def test_validation_messages_name_the_field_without_internals(http: httpx.AsyncClient) -> None:
    cases = [
        ("/chat", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/chat", {"messages": [{"role": "user"}]}, "messages.0.content"),
        ("/complete", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/complete", {"prompt": "x", "bogus": 1}, "bogus"),
    ]
    for path, body, param in cases:
        response = await http.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert error["message"].startswith(param) or param in error["message"]
        assert not PYDANTIC_INTERNALS.search(error["message"]), error["message"]


async def test_wrong_method_is_a_405_envelope(http: httpx.AsyncClient) -> None:
    response = await http.get("/complete")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_refusals_are_counted(http: httpx.AsyncClient) -> None:
    """A refused request on a table endpoint is still counted and logged as a failed request."""
    before = (await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
    response = await http.post("/v1/completions", json={"model": "base", "prompt": "hi", "n": "many"})
    assert response.status_code == 400
    after = (await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
    line = 'gateway_errors_total{endpoint="v1_completions",type="invalid_request_error"}'

    def count(text: str) -> float:
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    assert count(after) == count(before) + 1
