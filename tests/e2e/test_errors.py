"""Bad input against the real stack: always the OpenAI envelope with the right status, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, Stack

USER = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "hello " * 3000  # about 3,000 tokens, over the 2,048-token context


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
def test_chat_on_a_base_model_points_to_complete(client: httpx.Client, path: str) -> None:
    error = assert_envelope(client.post(path, json={"model": BASE_MODEL, "messages": USER}), 400, "model")
    assert "base model" in error["message"] and "/complete" in error["message"]


@pytest.mark.parametrize("path", ["/chat", "/complete", "/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(client: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": "gpt-9", **({"messages": USER} if "chat" in path else {"prompt": "x"})}
    error = assert_envelope(client.post(path, json=body), 404, "model")
    # /v1 answers as vLLM does (tests/e2e/test_vllm_parity.py), the native routes in the gateway's words
    assert error["code"] == (404 if path.startswith("/v1") else "model_not_found")


@pytest.mark.parametrize("path", ["/complete"])  # /v1: vLLM's own refusal (test_vllm_parity.py)
def test_prompt_alone_over_the_context(client: httpx.Client, path: str) -> None:
    error = assert_envelope(
        client.post(path, json={"model": BASE_MODEL, "prompt": LONG_PROMPT}), 400, "prompt"
    )
    assert error["code"] == "context_length_exceeded"
    assert "2048" in error["message"]


def test_prompt_plus_max_tokens_over_the_context_names_the_numbers(client: httpx.Client) -> None:
    rendered = client.post("/chat/render", json={"messages": USER}).json()
    error = assert_envelope(
        client.post("/chat", json={"messages": USER, "max_tokens": 2040}), 400, "max_tokens"
    )
    prompt_tokens = rendered["num_tokens"]
    assert f"({prompt_tokens} tokens)" in error["message"]
    assert "2040" in error["message"] and "2048" in error["message"]
    assert f"at most {2048 - prompt_tokens}" in error["message"]


def test_omitted_max_tokens_fills_the_rest_of_the_context_natively(client: httpx.Client) -> None:
    prompt = "word " * 2000
    response = client.post("/complete", json={"prompt": prompt, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "length"  # it went on repeating "word" to the end of the context
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 2048


def test_omitted_max_tokens_on_v1_is_vllms_own_default(stack: Stack, client: httpx.Client) -> None:
    body = {"model": BASE_MODEL, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
    through = client.post("/v1/completions", json=body).json()["usage"]
    direct = httpx.post(f"{stack.worker_url(BASE_MODEL)}/v1/completions", json=body, timeout=120).json()[
        "usage"
    ]
    assert through == direct


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat", {"messages": USER, "temperature": -0.5}, "temperature"),
        ("/complete", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/chat", {"messages": USER, "max_tokens": 0}, "max_tokens"),
        ("/complete", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
        ("/chat", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"model": INSTRUCT_MODEL, "messages": []}, None),  # vLLM's: no param
        ("/chat", {"messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
        ("/chat", {"messages": [{"role": "user", "content": 5}]}, None),
        ("/chat", {"messages": "Hi"}, "messages"),
        ("/complete", {"prompt": ["a", "b"]}, "prompt"),
        ("/complete", {"prompt": ""}, "prompt"),
        ("/complete", {"prompt": "x", "n": "two"}, "n"),
        ("/complete", {"prompt": "x", "unknown_field": 1}, "unknown_field"),
        ("/complete", {}, "prompt"),
    ],
)
def test_invalid_fields(client: httpx.Client, path: str, body: dict[str, Any], param: str | None) -> None:
    assert_envelope(client.post(path, json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b""])
@pytest.mark.parametrize("path", ["/complete", "/chat", "/v1/completions", "/v1/chat/completions"])
def test_malformed_bodies(client: httpx.Client, path: str, raw: bytes) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_envelope(response, 400)


def test_unknown_route_and_method_use_the_envelope(client: httpx.Client) -> None:
    assert_envelope(client.get("/nope"), 404)
    assert_envelope(client.get("/complete"), 405)
