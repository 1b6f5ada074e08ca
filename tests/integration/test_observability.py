"""Metrics, request ids and the per-request log line, with exact expectations from the stand-in."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY
from tests.integration.standin import Script
from tests.promtext import Samples, delta, parse, value

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_a_known_set_of_requests_moves_every_metric_exactly(
    http: httpx.AsyncClient, script: Script
) -> None:
    before = await scrape(http)
    ok = await http.post("/complete", json={"model": "base", "prompt": "x"})
    async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as streamed:
        assert [line async for line in streamed.aiter_lines()][-2] == "data: [DONE]"
    unknown = await http.post("/chat", json={**CHAT, "model": "nope"})
    invalid = await http.post("/complete", json={"prompt": ""})
    script.mode = "fail"
    failed = await http.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert [r.status_code for r in (ok, unknown, invalid, failed)] == [200, 404, 400, 502]
    after = await scrape(http)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert moved("gateway_requests_total", endpoint="complete", model="base", status="200") == 1
    assert moved("gateway_requests_total", endpoint="chat", model="chat", status="200") == 1
    assert moved("gateway_requests_total", endpoint="chat", model="unknown", status="404") == 1
    assert moved("gateway_requests_total", endpoint="complete", model="unknown", status="400") == 1
    assert moved("gateway_requests_total", endpoint="v1_completions", model="base", status="502") == 1
    assert moved("gateway_request_duration_seconds_count", endpoint="chat", model="chat", status="200") == 1
    assert moved("gateway_errors_total", endpoint="chat", type="invalid_request_error") == 1
    assert moved("gateway_errors_total", endpoint="complete", type="invalid_request_error") == 1
    assert moved("gateway_errors_total", endpoint="v1_completions", type="upstream_error") == 1
    # Time to first token: both successes; the stream's four tokens give three gaps.
    assert moved("gateway_time_to_first_token_seconds_count", endpoint="complete", model="base") == 1
    assert moved("gateway_time_to_first_token_seconds_count", endpoint="chat", model="chat") == 1
    assert moved("gateway_inter_token_latency_seconds_count", endpoint="chat", model="chat") == 3
    assert moved("gateway_inter_token_latency_seconds_count", endpoint="complete", model="base") == 0
    ttft = moved("gateway_time_to_first_token_seconds_sum", endpoint="chat", model="chat")
    duration = moved("gateway_request_duration_seconds_sum", endpoint="chat", model="chat", status="200")
    assert 0 < ttft <= duration
    # Tokens: the stand-in reports 4 completion tokens and one prompt token per prompt id.
    assert moved("gateway_completion_tokens_total", model="base") == 4
    assert moved("gateway_completion_tokens_total", model="chat") == 4
    assert moved("gateway_prompt_tokens_total", model="base") == 1
    assert moved("gateway_template_render_seconds_count", model="chat") == 1
    assert moved("gateway_queue_wait_seconds_count", model="base") == 2  # the 502 one waited too
    assert value(after, "gateway_requests_in_flight", model="base") == 0
    assert value(after, "gateway_requests_in_flight", model="chat") == 0


async def test_in_flight_and_disconnects(http: httpx.AsyncClient, script: Script) -> None:
    script.tokens = ["t"] * 200
    script.token_delay = 0.01
    before = await scrape(http)
    async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
        assert value(await scrape(http), "gateway_requests_in_flight", model="chat") == 1
    for _ in range(100):
        after = await scrape(http)
        if value(after, "gateway_requests_in_flight", model="chat") == 0:
            break
        await asyncio.sleep(0.02)
    assert value(after, "gateway_requests_in_flight", model="chat") == 0
    assert delta(before, after, "gateway_client_disconnects_total", endpoint="chat", model="chat") == 1
    assert delta(before, after, "gateway_requests_total", endpoint="chat", model="chat", status="200") == 1


async def test_worker_up_follows_health(http: httpx.AsyncClient, script: Script) -> None:
    samples = await scrape(http)
    up = {dict(labels)["model"]: v for (name, labels), v in samples.items() if name == "gateway_worker_up"}
    assert up == {"base": 1.0, "chat": 1.0}
    script.healthy = False
    for _ in range(100):
        samples = await scrape(http)
        if all(v == 0 for (name, _), v in samples.items() if name == "gateway_worker_up"):
            break
        await asyncio.sleep(0.02)
    assert all(v == 0 for (name, _), v in samples.items() if name == "gateway_worker_up")


async def test_request_ids_are_echoed_or_made(http: httpx.AsyncClient) -> None:
    mine = await http.post("/complete", json={"prompt": "x"}, headers={"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    made = await http.post("/complete", json={"prompt": "x"})
    assert len(made.headers["x-request-id"]) == 32
    hostile = await http.get("/health", headers={"X-Request-Id": "x" * 500})
    assert hostile.headers["x-request-id"] != "x" * 500
    error = await http.post("/chat", json={"messages": []}, headers={"X-Request-Id": "err-1"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-1"


async def test_one_structured_log_line_per_request(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    prompt_tokens = (await http.post("/chat/render", json=CHAT)).json()["num_tokens"]
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await http.post("/chat", json=CHAT, headers={"X-Request-Id": "log-1"})
    lines = [
        r for r in caplog.records if r.name == "gateway.access" and getattr(r, "request_id", "") == "log-1"
    ]
    assert len(lines) == 1
    line = lines[0]
    fields = {
        k: getattr(line, k) for k in ("endpoint", "model", "status", "prompt_tokens", "completion_tokens")
    }
    assert fields == {
        "endpoint": "chat",
        "model": "chat",
        "status": 200,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,
    }
    assert 0 <= line.ttft_s <= line.duration_s


def test_json_log_format_carries_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    from service.ops.logs import configure_logging, stop_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        logging.getLogger("gateway.access").info("chat %s", "done", extra={"request_id": "r1", "status": 200})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("service.test").exception("failed %d", 3)
    finally:
        stop_logging()  # the writer thread has written everything queued
        root.handlers[:], level = saved
        root.setLevel(level)
    access, failure = (json.loads(line) for line in capsys.readouterr().err.strip().splitlines()[-2:])
    assert {"time", "level", "logger", "request_id", "message", "status"} <= set(access)
    assert access["request_id"] == "r1" and access["status"] == 200 and access["message"] == "chat done"
    assert failure["message"] == "failed 3" and failure["level"] == "ERROR"
    assert "ValueError: boom" in failure["exc_info"]  # the traceback travels as its own field
