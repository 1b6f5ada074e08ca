"""Errors a person understands, through the real app: each field has one limit (the configured cap,
whatever the amount asked), a refusal names the field the client sent, and a field that would be
silently ignored is refused instead."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("field", ["max_tokens", "stop", "n", "stream"])
async def test_a_generation_field_next_to_a_continuation_is_refused_naming_it(
    http: httpx.AsyncClient, script: Script, field: str
) -> None:
    value = {"max_tokens": 5, "stop": ".", "n": 2, "stream": True}[field]
    body = {"prompt": "The capital of France is", "continuation": " Paris", field: value}
    response = await http.post("/complete", json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field, response.text
    assert "nothing is generated" in error["message"] and f"`{field}`" in error["message"]
    assert script.bodies == []


@pytest.mark.parametrize(("path", "field", "over", "cap"), [
    ("/complete", "n", 9, 8), ("/complete", "n", 100, 8), ("/chat", "n", 9, 8), ("/chat", "n", 16, 8),
    # GATEWAY_MAX_STOP's default is vLLM's own limit (4): a fifth stop would otherwise meet vLLM's
    ("/complete", "stop", ["s"] * 5, 4), ("/complete", "stop", ["s"] * 40, 4),
])  # fmt: skip
async def test_one_limit_per_field_on_the_native_routes(
    http: httpx.AsyncClient, path: str, field: str, over: object, cap: int
) -> None:
    body = {"prompt": "x"} if path == "/complete" else {"messages": HI}
    response = await http.post(path, json={**body, field: over})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field
    assert error["message"].endswith(f"this gateway allows at most {cap}.")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "chat", "messages": HI, "max_completion_tokens": 65},
         "max_completion_tokens"),
        ("/v1/chat/completions", {"model": "chat", "messages": HI, "max_tokens": 65}, "max_tokens"),
        ("/v1/responses", {"model": "chat", "input": "Hi", "max_output_tokens": 65}, "max_output_tokens"),
        ("/v1/chat/completions", {"model": "chat", "messages": HI, "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ("/complete", {"prompt": "x" * 101}, "prompt"),
        ("/complete", {"prompt": "x", "examples": [{"input": "a" * 60, "output": "b" * 60}]}, "examples"),
        ("/complete", {"prompt": "x", "continuation": "y" * 100}, "continuation"),
        ("/chat", {"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
    ],
)  # fmt: skip
async def test_a_cap_names_the_field_the_client_sent(
    standin_url: str, script: Script, path: str, body: dict[str, object], param: str
) -> None:
    settings = standin_settings(standin_url, max_tokens_limit=64, max_prompt_chars=100)
    async with running_gateway(settings) as (_, http):
        response = await http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, response.text
    assert script.bodies == []


async def test_a_chat_over_the_context_names_its_messages(standin_url: str, script: Script) -> None:
    script.max_model_len = 64  # the worker's context, as its /v1/models says
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        response = await http.post("/chat", json={"messages": [{"role": "user", "content": "word " * 80}]})
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert script.bodies == []
