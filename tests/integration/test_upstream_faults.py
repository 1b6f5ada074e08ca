"""Worker faults through the real gateway app: each becomes the right status and envelope,
and nothing leaks (outstanding counts back to zero, upstream streams closed)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.core.gateway import Gateway
from tests.helpers import outstanding
from tests.integration.standin import Script

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}


async def test_worker_4xx_passes_through_unchanged(http: httpx.AsyncClient, script: Script) -> None:
    script.mode = "reject"
    response = await http.post("/complete", json={"prompt": "x", "n": 2, "temperature": 0})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "n must be 1 when using greedy sampling, got 2.",
            "type": "BadRequestError",
            "param": "n",
            "code": 400,
        }
    }


@pytest.mark.parametrize("chunked", [False, True], ids=["declared length", "chunked"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_worker_4xx_with_a_huge_error_keeps_its_status_and_a_clipped_message(
    http: httpx.AsyncClient, script: Script, chunked: bool, stream: bool
) -> None:
    """vLLM echoes a whole `bad_words` list in its 400 (3.5 MB for 300,000 words): still a 400 with
    the worker's message, clipped as every message is; the rest of the answer is never read."""
    script.mode, script.reject_echo, script.chunked_answers = "reject", 300_000, chunked
    response = await http.post("/v1/chat/completions", json={**CHAT, "model": "chat", "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("Too many bad words after tokenization. (parameter=bad_words, value=")
    assert error["message"].endswith("...") and len(error["message"]) == 1000, error["message"][-200:]
    assert "w1\u00e9q" in error["message"] and error["param"] == "bad_words"


async def test_worker_5xx_is_a_502(http: httpx.AsyncClient, script: Script, gateway: Gateway) -> None:
    script.mode = "fail"
    response = await http.post("/chat", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert outstanding(gateway) == 0


async def test_malformed_worker_answer_is_a_502(http: httpx.AsyncClient, script: Script) -> None:
    script.mode = "garbage"
    for path, body in (("/chat", CHAT), ("/v1/completions", {"model": "base", "prompt": "x"})):
        response = await http.post(path, json=body)
        assert response.status_code == 502, response.text
        assert "malformed" in response.json()["error"]["message"]


async def test_streamed_4xx_before_the_first_byte_is_a_plain_error(
    http: httpx.AsyncClient, script: Script
) -> None:
    script.mode = "reject"
    response = await http.post("/chat", json={**CHAT, "stream": True})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"


async def test_death_mid_stream_ends_with_an_error_event_then_done(
    http: httpx.AsyncClient, script: Script, gateway: Gateway
) -> None:
    script.mode = "die_mid_stream"
    async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    payloads = [line.removeprefix("data: ") for line in lines]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "upstream_error"
    assert [json.loads(p)["delta"] for p in payloads[:-2]] == ["Hello", ","]
    assert outstanding(gateway) == 0


async def test_client_disconnect_closes_the_upstream_stream(
    http: httpx.AsyncClient, script: Script, gateway: Gateway
) -> None:
    script.tokens = ["tok"] * 1000
    script.token_delay = 0.01
    async with http.stream(
        "POST", "/complete", json={"prompt": "x", "stream": True, "max_tokens": 1000}
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
        assert script.open_streams == 1
        assert outstanding(gateway) == 1
    for _ in range(200):
        if script.aborted_streams == 1 and outstanding(gateway) == 0:
            break
        await asyncio.sleep(0.01)
    assert script.aborted_streams == 1
    assert script.open_streams == 0
    assert outstanding(gateway) == 0


async def test_ready_follows_worker_health(http: httpx.AsyncClient, script: Script) -> None:
    script.healthy = False
    for _ in range(100):
        if (await http.get("/ready")).status_code == 503:
            break
        await asyncio.sleep(0.02)
    ready = await http.get("/ready")
    assert ready.status_code == 503
    assert sorted(ready.json()["not_ready"]) == ["base", "chat"]
    refused = await http.post("/complete", json={"prompt": "x"})
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert script.bodies == []  # refused before anything went upstream
    assert (await http.get("/health")).status_code == 200
    script.healthy = True
    for _ in range(100):
        if (await http.get("/ready")).status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert (await http.get("/ready")).status_code == 200
