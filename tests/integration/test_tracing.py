"""Tracing, read back from an in-test OTLP/HTTP receiver: the span tree of a non-streamed, a streamed
and a failed-over request, an incoming `traceparent` respected, the worker handed the attempt's
context; the gateway/upstream split in `Server-Timing`; nothing of tracing when it is off."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from bench.otlp_sink import Receiver, Sink, Span
from tests.integration.conftest import extra_standin, first_replica_first, running_gateway, standin_settings
from tests.integration.standin import Script

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"
SERVER_TIMING = re.compile(r"^gateway;dur=(\d+\.\d+), upstream;dur=(\d+\.\d+)$")


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sink]:
    receiver = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export every 50 ms, not every 5 s
    with receiver as received:
        yield received


@pytest.fixture
async def traced(sink: Sink, standin_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(standin_settings(standin_url)) as (_, client):
        yield client


def request_spans(sink: Sink, request_id: str, attempts: int = 1) -> dict[str, list[Span]]:
    """The spans of one request by name, once its server span and `attempts` attempts have arrived."""

    def complete(spans: list[Span]) -> bool:
        servers = [s for s in spans if s.attributes.get("gateway.request_id") == request_id]
        if not servers:
            return False
        children = [s for s in spans if s.parent_id == servers[0].span_id]
        return sum(s.kind == "client" for s in children) >= attempts

    spans = sink.wait_for(complete)
    server = next(s for s in spans if s.attributes.get("gateway.request_id") == request_id)
    tree: dict[str, list[Span]] = {"server": [server]}
    for span in spans:
        if span.parent_id == server.span_id:
            tree.setdefault("attempt" if span.kind == "client" else span.name, []).append(span)
    return tree


def parent_of(traceparent: str | None) -> tuple[str, str]:
    assert traceparent is not None
    _, trace_id, parent_id, _ = traceparent.split("-")
    return trace_id, parent_id


async def test_a_request_is_one_trace_under_the_callers_parent(
    traced: httpx.AsyncClient, sink: Sink, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = await traced.post("/v1/chat/completions", json=CHAT, headers={"traceparent": incoming})
    assert response.status_code == 200, response.text
    tree = request_spans(sink, response.headers["x-request-id"])
    server = tree["server"][0]
    assert (server.trace_id, server.parent_id, server.kind) == (INCOMING_TRACE, INCOMING_PARENT, "server")
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["gen_ai.usage.output_tokens"] == 4  # the stand-in's four tokens
    assert server.attributes["http.response.status_code"] == 200
    (render,), (queue,), (attempt,) = tree["gateway.render"], tree["gateway.queue"], tree["attempt"]
    assert render.end_ns <= queue.start_ns <= queue.end_ns <= attempt.start_ns
    assert attempt.name == "chat chat" and attempt.attributes["gen_ai.operation.name"] == "chat"
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ["length"]
    # The worker was told the attempt is its parent: vLLM's span hangs under it.
    assert parent_of(script.traceparents[-1]) == (INCOMING_TRACE, attempt.span_id)
    assert any(getattr(r, "trace_id", None) == INCOMING_TRACE for r in caplog.records)  # access log
    gateway_ms, upstream_ms = map(float, SERVER_TIMING.match(response.headers["server-timing"]).groups())  # type: ignore[union-attr]
    assert upstream_ms > 0 and gateway_ms > 0
    assert upstream_ms / 1e3 <= attempt.seconds + 0.005


async def test_a_stream_keeps_its_attempt_open_until_the_worker_is_done(
    traced: httpx.AsyncClient, sink: Sink, script: Script
) -> None:
    script.token_delay = 0.05
    body = {"model": "base", "prompt": "Hi", "max_tokens": 4, "stream": True}
    async with traced.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        [line async for line in response.aiter_lines()]
    tree = request_spans(sink, response.headers["x-request-id"])
    server, (attempt,) = tree["server"][0], tree["attempt"]
    assert server.parent_id == "" and attempt.name == "text_completion base"
    assert attempt.seconds >= 0.15  # four tokens 50 ms apart: the span covers the whole stream
    assert server.attributes["gen_ai.usage.output_tokens"] == 4
    assert server.attributes["gen_ai.response.finish_reasons"] == ["length"]  # read from the stream
    assert parent_of(script.traceparents[-1]) == (server.trace_id, attempt.span_id)


async def test_a_failover_shows_both_attempts(
    sink: Sink, standin_url: str, script: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with extra_standin() as (other, other_url):
        other.mode = "fail"
        async with running_gateway(standin_settings(other_url, standin_url, health_interval=60)) as (
            app,
            http,
        ):
            with first_replica_first(app.state.gateway.pools["chat"]):  # the failing one
                response = await http.post("/chat", json=CHAT)
    assert response.status_code == 200, response.text
    tree = request_spans(sink, response.headers["x-request-id"], attempts=2)
    first, second = sorted(tree["attempt"], key=lambda span: span.start_ns)
    assert first.error and not second.error
    assert (
        first.attributes["server.address"] == other_url and second.attributes["server.address"] == standin_url
    )
    assert len(tree["gateway.queue"]) == 2  # a wait for a slot before each attempt
    assert parent_of(other.traceparents[-1])[1] == first.span_id
    assert parent_of(script.traceparents[-1])[1] == second.span_id


async def test_tracing_off_costs_no_thread_and_no_header(standin_url: str, script: Script) -> None:
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        response = await http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert app.state.tracing is None and app.state.gateway.tracing is None
    assert script.traceparents[-1] is None  # nothing sent to the worker
    assert not [t.name for t in threading.enumerate() if "Otel" in t.name]
    assert SERVER_TIMING.match(response.headers["server-timing"])  # the split is there all the same


async def test_a_request_to_an_adapter_carries_it_on_its_spans(
    sink: Sink, standin_url: str, script: Script, tmp_path: Path
) -> None:
    from tests.adapters import adapter_folder
    from tests.integration.test_adapters import lora_settings

    qa = adapter_folder(tmp_path, "qa")
    script.served = {"base", "chat", "plain"}
    async with running_gateway(lora_settings(standin_url, tmp_path, [{"name": "qa", "path": str(qa)}])) as (
        _, client,
    ):  # fmt: skip
        response = await client.post("/v1/completions", json={"model": "qa", "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        tree = request_spans(sink, response.headers["x-request-id"])
    server, (attempt,) = tree["server"][0], tree["attempt"]
    assert server.attributes["gateway.adapter"] == "qa" and server.attributes["gen_ai.request.model"] == "qa"
    assert attempt.name == "text_completion qa" and attempt.attributes["gateway.adapter"] == "qa"
    spans = sink.wait_for(lambda spans: any(s.name == "gateway.adapter_load" for s in spans))
    (load,) = [s for s in spans if s.name == "gateway.adapter_load" and s.trace_id == server.trace_id]
    assert load.attributes["gateway.adapter.outcome"] == "loaded" and load.parent_id == server.span_id
