"""Hostile and odd input through the real app: every case is a 4xx with the envelope or a clean
200, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.standin import Script

UNICODE_PROMPTS = [
    '"\\ud800 lone high surrogate"',
    '"\\udfff lone low surrogate"',
    '"nul \\u0000 inside"',
    '"emoji 👩\u200d👩\u200d👧 and flags 🇫🇷"',
    '"combining e\u0301\u0301\u0301 and RTL \u202e txet"',
    '"\ufeffBOM first"',
]


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS)
@pytest.mark.parametrize(
    "path", ["/complete", "/chat", "/v1/completions", "/v1/chat/completions", "/chat/render"]
)
async def test_unicode_edge_cases_never_500(
    http: httpx.AsyncClient, script: Script, path: str, prompt: str
) -> None:
    if "chat" in path:
        raw = '{"model": "chat", "messages": [{"role": "user", "content": PROMPT}]}'.replace("PROMPT", prompt)
    else:
        raw = '{"model": "base", "prompt": PROMPT}'.replace("PROMPT", prompt)
    response = await http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code in {200, 400}, response.text
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert "surrogate" in error["message"] or "unicode" in error["message"].lower()


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("text/plain", b'{"prompt": "x"}'),
        ("application/json", b"\xff\xfe not utf-8"),
        ("application/json", b'{"prompt": "x", "prompt": 5}'),
        ("application/json", b"null"),
        ("application/json", b'{"prompt": "x", "max_tokens": 1e309}'),
        ("application/json", b'{"prompt": "x", "seed": 99999999999999999999999}'),
        ("application/json", b'{"prompt": "x", "temperature": "NaN"}'),
    ],
)
async def test_malformed_requests_are_4xx(http: httpx.AsyncClient, content_type: str, raw: bytes) -> None:
    response = await http.post("/complete", content=raw, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


LONG = [{"role": "user", "content": "word " * 3000}]  # over the stand-in's 2,048-token context
SHORT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "named"),
    [
        ("/chat", {"messages": LONG}, "messages", "The prompt is"),
        # On /v1 the context is the worker's to check, in vLLM's words (tests/e2e/test_vllm_parity.py).
        ("/v1/chat/completions", {"messages": SHORT, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
         "top_logprobs is 21"),
        ("/v1/responses", {"input": "hi", "top_logprobs": 50}, "top_logprobs", "top_logprobs is 50"),
    ],
)  # fmt: skip
async def test_errors_name_the_field_the_client_sent(
    http: httpx.AsyncClient, script: Script, path: str, body: dict[str, object], param: str, named: str
) -> None:
    """A chat has no `prompt` and `max_completion_tokens` is not `max_tokens`: the error names what was
    sent (reliability.md: "a 400 naming the field")."""
    response = await http.post(path, json={"model": "chat", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error
    assert script.bodies == []


@pytest.mark.parametrize("name", ["0aa", "a.b", "[x]", "k" * 100_000])
async def test_an_unknown_field_is_named_as_sent_and_never_echoed_whole(
    http: httpx.AsyncClient, name: str
) -> None:
    """It said 'supplied: None' for a name that is not an identifier, and repeated a 4 MB one whole."""
    response = await http.post("/complete", json={"model": "base", "prompt": "hi", name: 1})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == (name if len(name) <= 64 else name[:64] + "...")
    assert len(response.content) < 1000 and "None" not in error["message"]
