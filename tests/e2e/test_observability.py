"""Metrics, request ids and readiness against the real stack: exact deltas for a known set of requests."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, OPERATOR
from tests.promtext import Samples, delta, parse, value


def scrape(client: httpx.Client) -> Samples:
    return parse(client.get("/metrics", headers=OPERATOR).text)


def streamed(client: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_a_known_set_of_requests_moves_the_metrics_exactly(client: httpx.Client) -> None:
    before = scrape(client)
    hi = [{"role": "user", "content": "Hi"}]
    complete = client.post("/complete", json={"prompt": "The sea is", "max_tokens": 4}).json()
    chat_events = streamed(client, "/chat", {"messages": hi, "max_tokens": 6, "stream": True})
    v1_chat = client.post(
        "/v1/chat/completions", json={"model": INSTRUCT_MODEL, "messages": hi, "max_tokens": 4}
    ).json()
    v1_events = streamed(
        client,
        "/v1/completions",
        {"model": BASE_MODEL, "prompt": "One, two,", "max_tokens": 5, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    refused = client.post("/chat", json={"model": BASE_MODEL, "messages": hi})
    unknown = client.post("/complete", json={"model": "nope", "prompt": "x"})
    assert (refused.status_code, unknown.status_code) == (400, 404)
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    finished = [
        ("complete", BASE_MODEL, "200"),
        ("chat", INSTRUCT_MODEL, "200"),
        ("v1_chat_completions", INSTRUCT_MODEL, "200"),
        ("v1_completions", BASE_MODEL, "200"),
        ("chat", BASE_MODEL, "400"),
        ("complete", "unknown", "404"),
    ]
    for endpoint, model, status in finished:
        labels = {"endpoint": endpoint, "model": model, "status": status}
        assert moved("gateway_requests_total", **labels) == 1, labels
        assert moved("gateway_request_duration_seconds_count", **labels) == 1, labels
    for endpoint, model, _ in finished[:4]:
        assert moved("gateway_time_to_first_token_seconds_count", endpoint=endpoint, model=model) == 1
        ttft = moved("gateway_time_to_first_token_seconds_sum", endpoint=endpoint, model=model)
        total = moved("gateway_request_duration_seconds_sum", endpoint=endpoint, model=model, status="200")
        assert 0 < ttft <= total, (endpoint, ttft, total)
    chat_tokens = [e for e in chat_events if e.get("delta")]
    v1_tokens = [e for e in v1_events if e["choices"] and e["choices"][0]["text"]]
    assert (
        moved("gateway_inter_token_latency_seconds_count", endpoint="chat", model=INSTRUCT_MODEL)
        == len(chat_tokens) - 1
    )
    assert (
        moved("gateway_inter_token_latency_seconds_count", endpoint="v1_completions", model=BASE_MODEL)
        == len(v1_tokens) - 1
    )
    base_usage = [complete["usage"], v1_events[-1]["usage"]]
    chat_usage = [chat_events[-1]["usage"], v1_chat["usage"]]
    assert moved("gateway_prompt_tokens_total", model=BASE_MODEL) == sum(
        u["prompt_tokens"] for u in base_usage
    )
    assert moved("gateway_completion_tokens_total", model=BASE_MODEL) == sum(
        u["completion_tokens"] for u in base_usage
    )
    assert moved("gateway_prompt_tokens_total", model=INSTRUCT_MODEL) == sum(
        u["prompt_tokens"] for u in chat_usage
    )
    assert moved("gateway_completion_tokens_total", model=INSTRUCT_MODEL) == sum(
        u["completion_tokens"] for u in chat_usage
    )
    assert moved("gateway_errors_total", endpoint="chat", type="invalid_request_error") == 1
    assert moved("gateway_errors_total", endpoint="complete", type="invalid_request_error") == 1
    assert moved("gateway_template_render_seconds_count", model=INSTRUCT_MODEL) == 2
    assert moved("gateway_queue_wait_seconds_count", model=BASE_MODEL) == 2
    for model in (BASE_MODEL, INSTRUCT_MODEL):
        assert value(after, "gateway_requests_in_flight", model=model) == 0
    up = {dict(labels)["model"]: v for (name, labels), v in after.items() if name == "gateway_worker_up"}
    assert up == {BASE_MODEL: 1.0, INSTRUCT_MODEL: 1.0}


def test_every_response_carries_a_request_id(client: httpx.Client) -> None:
    mine = client.post("/complete", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "e2e-7"})
    assert mine.headers["x-request-id"] == "e2e-7"
    assert client.get("/ready").headers["x-request-id"]
    error = client.post("/chat", json={"messages": "nope"})
    assert error.status_code == 400 and error.headers["x-request-id"]


def test_ready_names_models_when_ready(client: httpx.Client) -> None:
    body = client.get("/ready").json()
    shown = {name: body[name] for name in ("status", "models", "not_ready", "detail")}
    assert shown == {"status": "ready", "models": {BASE_MODEL: True, INSTRUCT_MODEL: True}, "not_ready": [],
                     "detail": {}}  # fmt: skip
    assert set(body) <= {"status", "models", "not_ready", "detail", "adapters"}  # adapters: where they are
