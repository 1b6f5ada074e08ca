"""Whole worker answers through the real gateway app: passed through as the worker's bytes with the
usage found in them, capped with a 502 that says what to ask for less of (from Content-Length and
by counting), never compressed, and native answers parsed whatever their size."""

from __future__ import annotations

import json

import httpx
import pytest

from service.core.gateway import Gateway
from tests.helpers import outstanding
from tests.integration.conftest import ADMIN_KEY, running_gateway, standin_settings
from tests.integration.standin import Script
from tests.promtext import delta, parse

BASE = {"model": "base", "prompt": "x"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}
CAP = 1 << 20
LARGE = 3 << 20  # over the size native answers are parsed on the loop (1 MiB)


async def metrics(http: httpx.AsyncClient) -> dict:  # type: ignore[type-arg]
    return parse((await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text)


@pytest.mark.parametrize(("path", "body"), [("/v1/completions", BASE), ("/v1/chat/completions", CHAT)])
async def test_a_large_answer_passes_through_as_its_bytes_with_its_usage(
    http: httpx.AsyncClient, script: Script, path: str, body: dict[str, object]
) -> None:
    script.answer_bytes = LARGE  # padding whose text looks like usage objects
    before = await metrics(http)
    response = await http.post(path, json=body)
    assert response.status_code == 200
    assert response.content == script.last_answer and len(response.content) > 3_000_000
    after = await metrics(http)
    model = body["model"]
    # The stand-in's usage (4 tokens), not the `"usage":{"prompt_tokens":999}` the text holds.
    assert delta(before, after, "gateway_completion_tokens_total", model=model) == 4  # type: ignore[arg-type]
    assert delta(before, after, "gateway_prompt_tokens_total", model=model) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_over_the_cap_is_a_502_that_says_what_to_ask_less_of(
    standin_url: str, script: Script, chunked: bool
) -> None:
    script.chunked_answers = chunked  # without a Content-Length, the read counts
    async with running_gateway(standin_settings(standin_url, max_answer_bytes=CAP)) as (app, http):
        script.answer_bytes = CAP - 4096
        assert (await http.post("/v1/completions", json=BASE)).status_code == 200
        script.answer_bytes = CAP + 4096
        for path, body in (("/v1/completions", BASE), ("/complete", {"prompt": "x"})):
            response = await http.post(path, json=body)
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["type"] == "upstream_error"
            assert f"limit of {CAP:,} bytes" in error["message"]
            assert "fewer prompts" in error["message"] and "logprobs" in error["message"]
        gateway: Gateway = app.state.gateway
        assert outstanding(gateway) == 0
        assert all(worker.healthy for pool in gateway.pools.values() for worker in pool.workers)


async def test_a_stream_event_over_the_cap_ends_the_stream_with_that_error(
    standin_url: str, script: Script
) -> None:
    script.tokens = ["a" * (CAP + 10)]
    settings = standin_settings(standin_url, max_answer_bytes=CAP)
    async with (
        running_gateway(settings) as (_, http),
        http.stream("POST", "/v1/completions", json={**BASE, "stream": True}) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "an event over this gateway's limit" in error["message"]


async def test_workers_are_asked_for_answers_as_they_are(http: httpx.AsyncClient, script: Script) -> None:
    script.compress = "allowed"  # a compressing ingress: gzip whenever the request allows it
    native = {"prompt": "x"}
    for path, body in (("/v1/completions", BASE), ("/v1/chat/completions", CHAT), ("/complete", native)):
        response = await http.post(path, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"]
    assert set(script.accept_encodings) == {"identity"}


async def test_an_answer_compressed_anyway_is_a_502_that_says_so(
    http: httpx.AsyncClient, script: Script
) -> None:
    script.compress = "always"
    response = await http.post("/v1/completions", json=BASE)
    assert response.status_code == 502
    assert "Content-Encoding 'gzip'" in response.json()["error"]["message"]


async def test_a_large_native_answer_is_parsed_whole(http: httpx.AsyncClient, script: Script) -> None:
    script.answer_bytes = LARGE  # parsed in a thread, by the decoder that yields
    script.tokens = ["Hello", " world"]
    response = await http.post("/complete", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["text"] == "Hello world"
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_a_native_answer_that_is_not_json_is_a_502(http: httpx.AsyncClient, script: Script) -> None:
    script.mode = "broken_json"  # framed as an object, broken inside: only a parse finds out
    response = await http.post("/complete", json={"prompt": "x"})
    assert response.status_code == 502 and "malformed" in response.json()["error"]["message"]
